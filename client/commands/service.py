"""`speclora service install|uninstall|status|logs`: run the daemon under launchd or systemd."""

from __future__ import annotations

import subprocess
import sys

import click
from speclora.client.commands.daemon import running_pid
from speclora.client.render import daemon_side
from speclora.shared.config import ConfigError, load_config
from speclora.shared.paths import resolve_paths

_PLATFORM = click.option(
    "--platform",
    type=click.Choice(["launchd", "systemd"]),
    hidden=True,  # for tests and the curious; the default follows the OS
    help="Service manager to use (default: launchd on macOS, systemd elsewhere).",
)


def _manager(platform: str | None):  # type: ignore[no-untyped-def]
    with daemon_side("service"):
        from speclora.daemon.service import manager_for

    return manager_for(platform)


@click.group("service")
def service_group() -> None:
    """Run the daemon as a login service (launchd on macOS, systemd --user on Linux)."""


@service_group.command()
@_PLATFORM
@click.pass_context
def install(ctx: click.Context, platform: str | None) -> None:
    """Install and start the service; it then starts at every login."""
    with daemon_side("service install"):
        from speclora.daemon.service import ServiceError, make_spec

    paths = resolve_paths()
    config_path = ctx.obj.get("config_path")
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(f"{exc}\nFix the configuration and try again.") from None
    pid = running_pid(paths)
    if pid:
        raise click.ClickException(
            f"a daemon is already running (pid {pid}); stop it first with: speclora daemon stop"
        )
    spec = make_spec(paths, config.server.shutdown_grace_s, config_path)
    try:
        for line in _manager(platform).install(spec):
            click.echo(line)
    except ServiceError as exc:
        raise click.ClickException(str(exc)) from None


@service_group.command()
@_PLATFORM
def uninstall(platform: str | None) -> None:
    """Stop the service and remove it."""
    with daemon_side("service"):
        from speclora.daemon.service import ServiceError

    try:
        for line in _manager(platform).uninstall():
            click.echo(line)
    except ServiceError as exc:
        raise click.ClickException(str(exc)) from None


@service_group.command()
@_PLATFORM
def status(platform: str | None) -> None:
    """Show the service manager's view of the service (exit 3 when not running)."""
    with daemon_side("service"):
        from speclora.daemon.service import ServiceError

    try:
        running, text = _manager(platform).status()
    except ServiceError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(text)
    if not running:
        sys.exit(3)


@service_group.command()
@click.option("-n", "--lines", type=int, default=100, show_default=True, help="Lines to show.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@_PLATFORM
def logs(lines: int, follow: bool, platform: str | None) -> None:
    """Show the daemon's service log."""
    command = _manager(platform).logs_command(resolve_paths().daemon_log, lines, follow)
    try:
        sys.exit(subprocess.call(command))
    except FileNotFoundError:
        raise click.ClickException(f"{command[0]} was not found") from None
    except KeyboardInterrupt:
        pass
