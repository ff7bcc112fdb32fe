"""`speclora adapters`: list, inspect, activate and roll back draft adapters.

Reads the adapter directories directly (no MLX). Activation goes through a running daemon's
ActivateAdapter RPC when one answers, so the new weights are swapped in at once; otherwise
only the pointer file changes and the daemon loads that adapter at its next start.
"""

from __future__ import annotations

import json
import time
from typing import Any

import click
from speclora.daemon.errors import AdapterError
from speclora.daemon.learning.adapters import NONE_VERSIONS, PROMOTED, AdapterInfo, AdapterStore
from speclora.shared.config import ConfigError
from speclora.shared.paths import resolve_paths


def _store() -> AdapterStore:
    return AdapterStore(resolve_paths().adapters_dir)


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
        "path": str(info.path) if info.path else None,
        "metadata": info.metadata,
    }


def _via_daemon(ctx: click.Context, version: str, rollback: bool) -> str | None:
    """Ask a running daemon to swap; returns what it reports, or None if none is running."""
    try:
        from speclora.client.stub import DaemonNotRunning, SpecLoRAClient, SpecLoRAClientError
    except ImportError:  # stub or grpc not available: pointer-only mode
        return None
    try:
        with SpecLoRAClient(config_path=(ctx.obj or {}).get("config_path")) as client:
            info = client.activate_adapter(version, rollback=rollback)
    except DaemonNotRunning:
        return None
    except ConfigError as exc:
        raise click.ClickException(f"{exc}\nFix the configuration and try again.") from None
    except SpecLoRAClientError as exc:
        raise click.ClickException(f"the daemon refused: {exc}") from None
    return info.version or "none"


@click.group("adapters")
def adapters_group() -> None:
    """List, inspect, activate and roll back draft adapters."""


@adapters_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def list_adapters(as_json: bool) -> None:
    """List adapter versions (the active one is marked with *)."""
    store = _store()
    infos = store.list()
    if as_json:
        click.echo(json.dumps([_info_json(i) for i in infos], indent=2))
        return
    if not infos:
        click.echo(f"No adapters yet ({store.root}); `speclora train` makes one.")
        return
    click.echo(f"  {'VERSION':8} {'STATUS':9} {'PARENT':7} {'BEFORE':>6} {'AFTER':>6}  CREATED")
    for i in infos:
        mark = "*" if i.active else " "
        created = (
            time.strftime("%Y-%m-%d %H:%M", time.localtime(i.created_at)) if i.created_at else "-"
        )
        click.echo(
            f"{mark} {i.version:8} {i.status:9} {i.parent or '-':7} "
            f"{i.acceptance_before:>6.3f} {i.acceptance_after:>6.3f}  {created}"
        )
    if not store.active_version():
        click.echo("(no adapter active: the base draft serves)")


@adapters_group.command("show")
@click.argument("version", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def show(version: str | None, as_json: bool) -> None:
    """Show one version (default: the active one) with its metadata."""
    store = _store()
    version = version or store.active_version()
    if not version:
        raise click.ClickException(
            "no adapter is active; name a version (`speclora adapters list`)"
        )
    try:
        info = store.get(version)
        store.verify(version)
        integrity = "ok"
    except AdapterError as exc:
        if not (store.root / version).is_dir():
            raise click.ClickException(str(exc)) from None
        integrity = str(exc)
        info = next((i for i in store.list() if i.version == version), None)
        if info is None:
            raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps({**_info_json(info), "integrity": integrity}, indent=2))
        return
    click.echo(f"{'version':18} {info.version}{' (active)' if info.active else ''}")
    click.echo(f"{'status':18} {info.status}")
    click.echo(f"{'reason':18} {info.reason or '-'}")
    click.echo(f"{'parent':18} {info.parent or 'base draft'}")
    click.echo(f"{'acceptance':18} {info.acceptance_before:.3f} -> {info.acceptance_after:.3f}")
    for key in ("train_cases", "heldout_cases", "steps", "final_loss", "draft_id", "duration_s"):
        if key in info.metadata:
            click.echo(f"{key:18} {info.metadata[key]}")
    click.echo(f"{'integrity':18} {integrity}")
    click.echo(f"{'path':18} {info.path}")


@adapters_group.command("activate")
@click.argument("version")
@click.option("--force", is_flag=True, help="Activate even a version the gate rejected.")
@click.pass_context
def activate(ctx: click.Context, version: str, force: bool) -> None:
    """Make VERSION the active adapter ("none" = the base draft)."""
    store = _store()
    if version not in NONE_VERSIONS:
        try:
            info = store.verify(version)
        except AdapterError as exc:
            raise click.ClickException(str(exc)) from None
        if info.status != PROMOTED and not force:
            raise click.ClickException(
                f"adapter {version} was {info.status} ({info.reason}); pass --force to use it anyway"
            )
    swapped = _via_daemon(ctx, "none" if version in NONE_VERSIONS else version, rollback=False)
    if swapped is not None:
        click.echo(f"Active adapter: {swapped} (swapped into the running daemon).")
        return
    try:
        store.activate(version, force=True)
    except AdapterError as exc:
        raise click.ClickException(str(exc)) from None
    shown = "none" if version in NONE_VERSIONS else version
    click.echo(f"Active adapter: {shown}. No daemon is running; it loads this at its next start.")


@adapters_group.command("rollback")
@click.pass_context
def rollback(ctx: click.Context) -> None:
    """Go back to the adapter that was active before the current one."""
    store = _store()
    pointer = store.pointer()
    if not pointer["version"] and not pointer["history"]:
        raise click.ClickException(
            "nothing to roll back: no adapter is active and there is no history"
        )
    swapped = _via_daemon(ctx, "", rollback=True)
    if swapped is not None:
        click.echo(f"Rolled back; active adapter: {swapped} (swapped into the running daemon).")
        return
    previous = store.rollback()
    click.echo(
        f"Rolled back; active adapter: {previous or 'none'}. No daemon is running; it loads "
        "this at its next start."
    )
