"""`speclora history`: what the history drafter keeps of past requests, and purging it.

Both commands ask the running daemon (the local one, or --address), like every other client
command: the daemon owns the history's file and its in-memory index.
"""

from __future__ import annotations

import json

import click
from speclora.client.render import address_option, client_errors, human_bytes
from speclora.client.stub import SpecLoRAClient

NEEDS_DAEMON = (
    "Asks the running daemon (the local one, or --address); with none running it says so and "
    "exits 2."
)


def _client(ctx: click.Context, address: str | None) -> SpecLoRAClient:
    return SpecLoRAClient(address, config_path=(ctx.obj or {}).get("config_path"))


@click.group("history", epilog=NEEDS_DAEMON)
def history_group() -> None:
    """Inspect and purge the history of past requests the history drafter proposes from."""


@history_group.command("stats", epilog=NEEDS_DAEMON)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@address_option
@click.pass_context
def stats(ctx: click.Context, as_json: bool, address: str | None) -> None:
    """How much of past requests the history holds, and how its proposals fare."""
    with client_errors(), _client(ctx, address) as client:
        s = client.stats()
    figures = {
        "requests": s.history_documents,
        "tokens": s.history_tokens,
        "bytes": s.history_bytes,
        "proposed": s.history_proposed,
        "accepted": s.history_accepted,
        "acceptance_recent": s.history_acceptance_recent,
        "target": s.target_model,
    }
    if as_json:
        click.echo(json.dumps(figures, indent=2))
        return
    click.echo(f"{'target':18} {s.target_model}")
    click.echo(f"{'requests':18} {s.history_documents}")
    click.echo(f"{'tokens':18} {s.history_tokens}")
    click.echo(f"{'index memory':18} {human_bytes(s.history_bytes)}")
    click.echo(
        f"{'proposals':18} {s.history_accepted}/{s.history_proposed} accepted since start "
        f"(recent {s.history_acceptance_recent:.3f})"
    )


@history_group.command("purge", epilog=NEEDS_DAEMON)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@address_option
@click.pass_context
def purge(ctx: click.Context, yes: bool, address: str | None) -> None:
    """Delete the stored history for good (vacuumed); the failure cases stay."""
    with client_errors(), _client(ctx, address) as client:
        if not yes:
            n = client.stats().history_documents
            click.confirm(f"Delete all {n} past requests (they contain your prompts)?", abort=True)
        deleted = client.purge_history()
    click.echo(
        f"Deleted {deleted} past request{'s' if deleted != 1 else ''}; the database is vacuumed."
    )
