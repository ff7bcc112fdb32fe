"""`speclora failures`: inspect, export and purge the recorded failure cases.

Every command asks the running daemon (ListFailureCases, GetFailureCase, ExportFailureCases,
GetFailureStats, PurgeFailureCases), so it reads the cases of the daemon it talks to, local or
over TCP, and never opens the database itself.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
from speclora.client.render import address_option, client_errors
from speclora.client.stub import SpecLoRAClient

NEEDS_DAEMON = (
    "Asks the running daemon (the local one, or --address); with none running it says so and "
    "exits 2."
)


def _client(ctx: click.Context, address: str | None) -> SpecLoRAClient:
    return SpecLoRAClient(address, config_path=(ctx.obj or {}).get("config_path"))


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


@click.group("failures")
def failures_group() -> None:
    """Inspect, export and purge recorded failure cases (through the daemon)."""


@failures_group.command("list", epilog=NEEDS_DAEMON)
@click.option("--limit", "-n", type=click.IntRange(min=1, max=1000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@address_option
@click.pass_context
def list_cases(ctx: click.Context, limit: int, as_json: bool, address: str | None) -> None:
    """List the newest failure cases."""
    with client_errors(), _client(ctx, address) as client:
        page = client.list_failure_cases(limit)
    if as_json:
        for case in page.cases:
            click.echo(json.dumps(case.to_json(), separators=(",", ":")))
        return
    if not page.cases:
        click.echo("No failure cases recorded.")
        return
    click.echo(
        f"{'ID':>6}  {'RECORDED':19}  {'ACCEPT':>6}  {'PROMPT':>6}  {'OUT':>5}  {'T':>4}  ADAPTER"
    )
    for c in page.cases:
        click.echo(
            f"{c.id:>6}  {_when(c.created_at):19}  {c.acceptance:>6.2f}  {len(c.prompt_ids):>6}  "
            f"{len(c.completion_ids):>5}  {c.temperature:>4.1f}  {c.adapter_version or '-'}"
        )
    if page.total > len(page.cases):
        click.echo(f"({len(page.cases)} of {page.total}; use --limit to see more)")


@failures_group.command("show", epilog=NEEDS_DAEMON)
@click.argument("case_id", type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print the case as JSON.")
@address_option
@click.pass_context
def show(ctx: click.Context, case_id: int, as_json: bool, address: str | None) -> None:
    """Show one failure case with its token ids and rejection positions."""
    with client_errors(), _client(ctx, address) as client:
        case = client.get_failure_case(case_id)
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


@failures_group.command("export", epilog=NEEDS_DAEMON)
@click.argument("path", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--format", "fmt", type=click.Choice(["jsonl"]), default="jsonl", show_default=True)
@address_option
@click.pass_context
def export(ctx: click.Context, path: str, fmt: str, address: str | None) -> None:
    """Export every case to PATH as JSON lines ("-" for stdout), streamed from the daemon."""
    n = 0
    with client_errors(), _client(ctx, address) as client:
        cases = client.export_failure_cases()
        if path == "-":
            for case in cases:
                sys.stdout.write(json.dumps(case.to_json(), separators=(",", ":")) + "\n")
            return
        target = Path(path)
        tmp = target.with_name(f".{target.name}.tmp")  # a whole file or none
        try:
            with open(tmp, "w", encoding="utf-8") as out:
                for case in cases:
                    out.write(json.dumps(case.to_json(), separators=(",", ":")) + "\n")
                    n += 1
            os.replace(tmp, target)
        except OSError as exc:
            raise click.ClickException(f"cannot write {path}: {exc.strerror}") from None
        finally:
            tmp.unlink(missing_ok=True)
    click.echo(f"Exported {n} case{'s' if n != 1 else ''} to {path}.", err=True)


@failures_group.command("purge", epilog=NEEDS_DAEMON)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@address_option
@click.pass_context
def purge(ctx: click.Context, yes: bool, address: str | None) -> None:
    """Delete every recorded case and the history of past requests for good (vacuumed)."""
    with client_errors(), _client(ctx, address) as client:
        if not yes:
            n = client.failure_stats().cases
            click.confirm(
                f"Delete all {n} failure cases and the history of past requests (they contain "
                "your prompts)?",
                abort=True,
            )
        deleted, history = client.purge_recorded()
    click.echo(f"Deleted {deleted} case{'s' if deleted != 1 else ''}; the database is vacuumed.")
    click.echo(f"Deleted {history} past request{'s' if history != 1 else ''} from the history.")


@failures_group.command("stats", epilog=NEEDS_DAEMON)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@address_option
@click.pass_context
def stats(ctx: click.Context, as_json: bool, address: str | None) -> None:
    """Summarise the failure buffer."""
    with client_errors(), _client(ctx, address) as client:
        s = client.failure_stats()
    if as_json:
        data = {k: v for k, v in s.__dict__.items() if k != "database_path"}
        click.echo(json.dumps({**data, "path": s.database_path}, indent=2))
        return
    click.echo(f"{'cases':18} {s.cases} ({s.pending} since the last training run)")
    click.echo(f"{'mean acceptance':18} {s.mean_acceptance:.3f}")
    click.echo(f"{'tokens':18} {s.prompt_tokens} prompt, {s.completion_tokens} completion")
    click.echo(f"{'oldest / newest':18} {_when(s.oldest)} / {_when(s.newest)}")
    for version, n in s.per_adapter.items():
        click.echo(f"{'  adapter ' + (version or 'none'):18} {n}")
    click.echo(f"{'database':18} {s.database_path} ({s.file_bytes / 1024:.0f} KiB)")
