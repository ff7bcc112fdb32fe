"""`speclora stats`: the daemon's acceptance, throughput, learning and memory."""

from __future__ import annotations

import dataclasses
import json

import click
from speclora.client.render import address_option, client_errors, is_tty, stats_lines
from speclora.client.stub import SpecLoRAClient, StatsSnapshot


@click.command()
@click.option("--watch", is_flag=True, help="Keep showing a fresh snapshot until Ctrl-C.")
@click.option(
    "--interval", type=float, default=1.0, show_default=True, help="Seconds between snapshots."
)
@click.option("--json", "as_json", is_flag=True, help="JSON (one object per line with --watch).")
@address_option
@click.pass_context
def stats(
    ctx: click.Context, watch: bool, interval: float, as_json: bool, address: str | None
) -> None:
    """Show acceptance, speed, learning and memory statistics."""
    tty = is_tty()
    with client_errors(), SpecLoRAClient(address, config_path=ctx.obj.get("config_path")) as client:
        if not watch:
            _show(client.stats(), as_json, tty, redraw=False)
            return
        stream = client.watch_stats(interval)
        try:
            for snap in stream:
                _show(snap, as_json, tty, redraw=tty and not as_json)
        except KeyboardInterrupt:
            stream.close()


def _show(snap: StatsSnapshot, as_json: bool, tty: bool, redraw: bool) -> None:
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(snap)))
        return
    if redraw:
        click.clear()
    click.echo("\n".join(stats_lines(snap, spark=tty)))
    if not tty:
        click.echo()
