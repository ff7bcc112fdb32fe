"""`speclora failures`: inspect, export and purge the recorded failure cases.

Reads the SQLite store directly (WAL lets it do so while the daemon writes), so it works with
or without a running daemon and never imports MLX.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click
from speclora.client.commands.history import purge_history_file
from speclora.daemon.learning.store import FailureStore, StoreError
from speclora.shared.config import ConfigError, load_config
from speclora.shared.paths import resolve_paths


def _open_store(ctx: click.Context, *, must_exist: bool = True) -> FailureStore | None:
    path = resolve_paths().database
    if must_exist and not path.exists():
        click.echo(f"No failure cases recorded yet (database: {path}).")
        return None
    try:
        cap = load_config((ctx.obj or {}).get("config_path")).learning.buffer_cap
    except ConfigError as exc:
        raise click.ClickException(f"{exc}\nFix the configuration and try again.") from None
    try:
        return FailureStore(path, cap=cap)
    except StoreError as exc:
        raise click.ClickException(
            f"{exc}\nMove the file away (or `speclora failures purge --yes`) to start afresh."
        ) from None


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


@click.group("failures")
def failures_group() -> None:
    """Inspect, export and purge recorded failure cases."""


@failures_group.command("list")
@click.option("--limit", "-n", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def list_cases(ctx: click.Context, limit: int, as_json: bool) -> None:
    """List the newest failure cases."""
    store = _open_store(ctx)
    if store is None:
        return
    with store:
        cases = store.list(limit=limit)
        total = store.count()
    if as_json:
        for case in cases:
            click.echo(json.dumps(case.to_json(), separators=(",", ":")))
        return
    if not cases:
        click.echo("No failure cases recorded.")
        return
    click.echo(
        f"{'ID':>6}  {'RECORDED':19}  {'ACCEPT':>6}  {'PROMPT':>6}  {'OUT':>5}  {'T':>4}  ADAPTER"
    )
    for c in cases:
        click.echo(
            f"{c.id:>6}  {_when(c.created_at):19}  {c.acceptance:>6.2f}  {len(c.prompt_ids):>6}  "
            f"{len(c.completion_ids):>5}  {c.temperature:>4.1f}  {c.adapter_version or '-'}"
        )
    if total > len(cases):
        click.echo(f"({len(cases)} of {total}; use --limit to see more)")


@failures_group.command("show")
@click.argument("case_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the case as JSON.")
@click.pass_context
def show(ctx: click.Context, case_id: int, as_json: bool) -> None:
    """Show one failure case with its token ids and rejection positions."""
    store = _open_store(ctx)
    if store is None:
        raise click.ClickException(f"no case {case_id}")
    with store:
        case = store.get(case_id)
    if case is None:
        raise click.ClickException(f"no case {case_id}; `speclora failures list` shows the ids")
    data: dict[str, Any] = case.to_json()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for key in (
        "id",
        "request_id",
        "mode",
        "finish_reason",
        "target_id",
        "draft_id",
        "adapter_version",
    ):
        click.echo(f"{key:20} {data[key] if data[key] not in (None, '') else '-'}")
    click.echo(f"{'recorded':20} {_when(case.created_at)}")
    click.echo(f"{'acceptance':20} {case.acceptance:.3f} ({case.accepted}/{case.proposed})")
    click.echo(
        f"{'sampling':20} temperature={case.temperature} top_p={case.top_p} "
        f"top_k={case.top_k} seed={case.seed}"
    )
    click.echo(f"{'prompt_ids':20} {list(case.prompt_ids)}")
    click.echo(f"{'completion_ids':20} {list(case.completion_ids)}")
    click.echo(f"{'rejections':20} {list(case.rejection_positions)}")


@failures_group.command("export")
@click.argument("path", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--format", "fmt", type=click.Choice(["jsonl"]), default="jsonl", show_default=True)
@click.pass_context
def export(ctx: click.Context, path: str, fmt: str) -> None:
    """Export every case to PATH as JSON lines ("-" for stdout)."""
    store = _open_store(ctx)
    if store is None:
        return
    with store:
        if path == "-":
            for case in store.iter_all():
                sys.stdout.write(json.dumps(case.to_json(), separators=(",", ":")) + "\n")
            return
        try:
            n = store.export_jsonl(Path(path))
        except OSError as exc:
            raise click.ClickException(f"cannot write {path}: {exc.strerror}") from None
    click.echo(f"Exported {n} case{'s' if n != 1 else ''} to {path}.", err=True)


@failures_group.command("purge")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def purge(ctx: click.Context, yes: bool) -> None:
    """Delete every recorded case and the history of past requests for good (both files are
    vacuumed)."""
    store = _open_store(ctx)
    if store is not None:
        with store:
            n = store.count()
            if not yes:
                click.confirm(
                    f"Delete all {n} failure cases and the history of past requests "
                    "(they contain your prompts)?",
                    abort=True,
                )
            deleted = store.purge()
        click.echo(
            f"Deleted {deleted} case{'s' if deleted != 1 else ''}; the database is vacuumed."
        )
    elif not yes and resolve_paths().history_database.exists():
        click.confirm("Delete the history of past requests (it contains your prompts)?", abort=True)
    rows = purge_history_file()  # the same prompts live there too
    if rows is not None:
        click.echo(f"Deleted {rows} past request{'s' if rows != 1 else ''} from the history.")


@failures_group.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.pass_context
def stats(ctx: click.Context, as_json: bool) -> None:
    """Summarise the failure buffer."""
    store = _open_store(ctx)
    if store is None:
        return
    with store:
        s = store.stats()
        path = store.path
    if as_json:
        click.echo(json.dumps({**s.__dict__, "path": str(path)}, indent=2))
        return
    click.echo(f"{'cases':18} {s.cases} ({s.pending} since the last training run)")
    click.echo(f"{'mean acceptance':18} {s.mean_acceptance:.3f}")
    click.echo(f"{'tokens':18} {s.prompt_tokens} prompt, {s.completion_tokens} completion")
    click.echo(f"{'oldest / newest':18} {_when(s.oldest)} / {_when(s.newest)}")
    for version, n in s.per_adapter.items():
        click.echo(f"{'  adapter ' + (version or 'none'):18} {n}")
    click.echo(f"{'database':18} {path} ({s.file_bytes / 1024:.0f} KiB)")
