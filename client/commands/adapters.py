"""`speclora adapters`: list, inspect, activate and roll back draft adapters.

Every command asks the running daemon (its ListAdapters, GetAdapter, ActivateAdapter and
RollbackAdapter RPCs), so it shows and changes what that daemon serves, local or over TCP.
The promotion gate is the daemon's: `--force` is how the command says "use it anyway".
"""

from __future__ import annotations

import json
import time
from typing import Any

import click
from speclora.client.render import address_option, client_errors
from speclora.client.stub import AdapterInfo, SpecLoRAClient

NEEDS_DAEMON = (
    "Asks the running daemon (the local one, or --address); with none running it says so and "
    "exits 2, changing nothing."
)
_META_KEYS = ("train_cases", "heldout_cases", "steps", "final_loss", "draft_id", "duration_s")


def _client(ctx: click.Context, address: str | None) -> SpecLoRAClient:
    return SpecLoRAClient(address, config_path=(ctx.obj or {}).get("config_path"))


def _info_json(info: AdapterInfo) -> dict[str, Any]:
    return {
        "version": info.version,
        "status": info.status,
        "active": info.active,
        "parent": info.parent,
        "reason": info.reason,
        "acceptance_before": info.acceptance_before,
        "acceptance_after": info.acceptance_after,
        "created_at": info.created_at,
        "path": info.path or None,
        "metadata": info.metadata,
    }


@click.group("adapters")
def adapters_group() -> None:
    """List, inspect, activate and roll back draft adapters (through the daemon)."""


@adapters_group.command("list", epilog=NEEDS_DAEMON)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@address_option
@click.pass_context
def list_adapters(ctx: click.Context, as_json: bool, address: str | None) -> None:
    """List adapter versions (the active one is marked with *)."""
    with client_errors(), _client(ctx, address) as client:
        listing = client.list_adapters()
    if as_json:
        click.echo(json.dumps([_info_json(i) for i in listing.adapters], indent=2))
        return
    if not listing.adapters:
        click.echo(f"No adapters yet ({listing.adapters_dir}); `speclora train` makes one.")
        return
    click.echo(
        f"  {'VERSION':8} {'STATUS':9} {'PARENT':7} {'BEFORE':>6} {'AFTER':>6}  {'BY':6}  CREATED"
    )
    for i in listing.adapters:
        mark = "*" if i.active else " "
        created = (
            time.strftime("%Y-%m-%d %H:%M", time.localtime(i.created_at)) if i.created_at else "-"
        )
        # Who started the run: "auto" (the daemon, while idle) or "manual" (`speclora train`).
        by = str(i.metadata.get("trigger") or "-")
        click.echo(
            f"{mark} {i.version:8} {i.status:9} {i.parent or '-':7} "
            f"{i.acceptance_before:>6.3f} {i.acceptance_after:>6.3f}  {by:6}  {created}"
        )
    if not listing.active_version:
        click.echo("(no adapter active: the base draft serves)")


@adapters_group.command("show", epilog=NEEDS_DAEMON)
@click.argument("version", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@address_option
@click.pass_context
def show(ctx: click.Context, version: str | None, as_json: bool, address: str | None) -> None:
    """Show one version (default: the active one) with its metadata and an integrity check."""
    with client_errors(), _client(ctx, address) as client:
        info = client.get_adapter(version)
    if as_json:
        click.echo(json.dumps({**_info_json(info), "integrity": info.integrity}, indent=2))
        return
    click.echo(f"{'version':18} {info.version}{' (active)' if info.active else ''}")
    click.echo(f"{'status':18} {info.status}")
    click.echo(f"{'reason':18} {info.reason or '-'}")
    click.echo(f"{'parent':18} {info.parent or 'base draft'}")
    click.echo(f"{'acceptance':18} {info.acceptance_before:.3f} -> {info.acceptance_after:.3f}")
    for key in _META_KEYS:
        if key in info.metadata:
            click.echo(f"{key:18} {info.metadata[key]}")
    click.echo(f"{'integrity':18} {info.integrity}")
    click.echo(f"{'path':18} {info.path}")


@adapters_group.command("activate", epilog=NEEDS_DAEMON)
@click.argument("version")
@click.option("--force", is_flag=True, help="Activate even a version the gate rejected.")
@address_option
@click.pass_context
def activate(ctx: click.Context, version: str, force: bool, address: str | None) -> None:
    """Make VERSION the active adapter ("none" = the base draft), swapped in at once."""
    with client_errors(), _client(ctx, address) as client:
        info = client.activate_adapter(version, force=force)
    click.echo(f"Active adapter: {info.version or 'none'} (swapped into the running daemon).")


@adapters_group.command("rollback", epilog=NEEDS_DAEMON)
@address_option
@click.pass_context
def rollback(ctx: click.Context, address: str | None) -> None:
    """Go back to the adapter that was active before the current one."""
    with client_errors(), _client(ctx, address) as client:
        info = client.rollback_adapter()
    click.echo(
        f"Rolled back; active adapter: {info.version or 'none'} (swapped into the running daemon)."
    )
