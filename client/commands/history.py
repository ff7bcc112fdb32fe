"""`speclora history`: what the history drafter keeps of past requests, and purging it.

Reads the history database directly (WAL lets it do so while the daemon writes), like
`speclora failures`, so it works with or without a running daemon and never imports MLX. A
running daemon watches the file's purge epoch and empties its memory within a second of a purge.
"""

from __future__ import annotations

import json
import time

import click
from speclora.daemon.learning.history_store import HistoryStore
from speclora.daemon.learning.store import StoreError
from speclora.shared.paths import resolve_paths


def open_history_store() -> HistoryStore | None:
    """The history database, or None when none was written yet."""
    path = resolve_paths().history_database
    if not path.exists():
        return None
    try:
        return HistoryStore(path)
    except StoreError as exc:
        raise click.ClickException(
            f"{exc}\nMove the file away to start afresh (it holds only past requests' tokens)."
        ) from None


def purge_history_file() -> int | None:
    """Delete every stored past request; None when there is no database."""
    store = open_history_store()
    if store is None:
        return None
    with store:
        return store.purge()


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


@click.group("history")
def history_group() -> None:
    """Inspect and purge the history of past requests the history drafter proposes from."""


@history_group.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def stats(as_json: bool) -> None:
    """Summarise the stored history (per target model)."""
    store = open_history_store()
    if store is None:
        click.echo(f"No history recorded yet (database: {resolve_paths().history_database}).")
        return
    with store:
        s = store.stats()
        path = store.path
    if as_json:
        click.echo(json.dumps({**s.__dict__, "path": str(path)}, indent=2))
        return
    click.echo(f"{'requests':18} {s.documents}")
    click.echo(f"{'tokens':18} {s.tokens}")
    click.echo(f"{'oldest / newest':18} {_when(s.oldest)} / {_when(s.newest)}")
    for target, (documents, tokens) in s.per_target.items():
        click.echo(f"  {target}: {documents} requests, {tokens} tokens")
    click.echo(f"{'database':18} {path} ({s.file_bytes / 1024:.0f} KiB)")


@history_group.command("purge")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def purge(yes: bool) -> None:
    """Delete the stored history for good (the file is vacuumed; a running daemon forgets it)."""
    store = open_history_store()
    if store is None:
        click.echo("No history recorded.")
        return
    with store:
        n = store.stats().documents
        if not yes:
            click.confirm(f"Delete all {n} past requests (they contain your prompts)?", abort=True)
        deleted = store.purge()
    click.echo(
        f"Deleted {deleted} past request{'s' if deleted != 1 else ''}; the database is vacuumed."
    )
