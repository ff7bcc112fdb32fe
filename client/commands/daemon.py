"""`speclora serve` (foreground) and `speclora daemon start|stop|status` (background)."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
from speclora.client.render import (
    EXIT_NOT_RUNNING,
    address_option,
    client_errors,
    daemon_side,
    human_duration,
)
from speclora.client.stub import DaemonNotRunning, SpecLoRAClient, SpecLoRAClientError
from speclora.shared.config import ConfigError, load_config, overrides_from_flags
from speclora.shared.paths import Paths, ensure_private_dir, resolve_paths


@click.command()
@click.option("--target", help="Target model (models.target): repo id, directory, .gguf, embedded.")
@click.option("--draft", help="Draft model (models.draft): as --target, self:N, or none.")
@click.option("--socket", "socket_path", help="Unix socket path (server.socket_path).")
@click.option("--tcp", "tcp_address", help="Also listen on HOST:PORT (server.tcp_address).")
@click.option(
    "--allow-non-loopback",
    is_flag=True,
    default=None,
    help="Allow --tcp on an address other than loopback.",
)
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="Log level."
)
@click.pass_context
def serve(
    ctx: click.Context,
    target: str | None,
    draft: str | None,
    socket_path: str | None,
    tcp_address: str | None,
    allow_non_loopback: bool | None,
    log_level: str | None,
) -> None:
    """Run the daemon in the foreground (launchd/systemd run this)."""
    with daemon_side("serve"):
        import speclora.daemon.blas  # noqa: F401  (OpenBLAS before anything imports mlx)
        from speclora.daemon.errors import SpecLoRAError
        from speclora.daemon.server import serve as run_daemon
        from speclora.shared.logging import configure_logging

    flags = {
        "models.target": target,
        "models.draft": draft,
        "server.socket_path": socket_path,
        "server.tcp_address": tcp_address,
        "server.allow_non_loopback": allow_non_loopback,
        "server.log_level": log_level,
    }
    try:
        config = load_config(ctx.obj.get("config_path"), overrides=overrides_from_flags(flags))
    except ConfigError as exc:
        raise click.ClickException(f"{exc}\nFix the configuration and try again.") from None
    configure_logging(config.server.log_level)
    try:
        code = run_daemon(config)
    except SpecLoRAError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


def running_pid(paths: Paths) -> int | None:
    """The daemon's pid if one holds the instance lock, else None.

    The lock, not the pid in the file, is the truth: a pid left by a killed daemon may since
    belong to another process, which `stop` must never signal.
    """
    try:
        fd = os.open(paths.lock_file, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            text = os.pread(fd, 32, 0).decode().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)  # we got it: nobody runs
        return None
    finally:
        os.close(fd)


@click.group("daemon")
def daemon_group() -> None:
    """Start, stop and inspect the background daemon."""


@daemon_group.command()
@click.option(
    "--timeout",
    type=float,
    default=600.0,
    show_default=True,
    help="Seconds to wait for it to serve (the first start may download or convert a model).",
)
@click.pass_context
def start(ctx: click.Context, timeout: float) -> None:
    """Start the daemon in the background and wait until it serves."""
    config_path = ctx.obj.get("config_path")
    paths = resolve_paths()
    with client_errors():
        address = SpecLoRAClient(config_path=config_path).address
    pid = running_pid(paths)
    if pid:
        click.echo(f"speclora daemon is already running (pid {pid}) on {address}")
        return
    ensure_private_dir(paths.log_dir)
    command = [sys.executable, "-m", "speclora"]
    if config_path:
        command += ["--config", str(Path(config_path).absolute())]
    command.append("serve")
    with open(paths.daemon_log, "ab") as log:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # survives this shell and its Ctrl-C
        )
    click.echo(f"starting speclora daemon (pid {proc.pid}), logs in {paths.daemon_log}", err=True)
    deadline = time.monotonic() + timeout
    while not _serving(address, config_path):
        if proc.poll() is not None:
            raise click.ClickException(
                f"the daemon exited with status {proc.returncode} while starting:\n"
                + _tail(paths.daemon_log, 8)
                + f"\nfull log: {paths.daemon_log}"
            )
        if time.monotonic() > deadline:
            raise click.ClickException(
                f"the daemon (pid {proc.pid}) did not start serving within {timeout:.0f}s; "
                f"see {paths.daemon_log}"
            )
        time.sleep(0.2)
    click.echo(f"speclora daemon started (pid {proc.pid}), listening on {address}")
    click.echo(f"logs: {paths.daemon_log}")


def _serving(address: str, config_path: str | None) -> bool:
    try:
        with SpecLoRAClient(address, config_path=config_path, connect_timeout=0.5) as client:
            return client.health(timeout=1.0) == "SERVING"
    except SpecLoRAClientError:
        return False


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@daemon_group.command()
@click.option("--timeout", type=float, help="Seconds to wait (default: the grace period + 15).")
@click.pass_context
def stop(ctx: click.Context, timeout: float | None) -> None:
    """Stop the daemon: SIGTERM, running streams get the grace period to finish."""
    paths = resolve_paths()
    pid = running_pid(paths)
    if pid is None:
        click.echo("speclora daemon is not running")
        return
    if pid < 0:
        raise click.ClickException(f"the daemon holds {paths.lock_file} but wrote no pid")
    if timeout is None:
        try:
            grace = load_config(ctx.obj.get("config_path")).server.shutdown_grace_s
        except ConfigError:
            grace = 10.0
        timeout = grace + 15.0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while running_pid(paths) is not None:
        if time.monotonic() > deadline:
            raise click.ClickException(
                f"the daemon (pid {pid}) did not stop within {timeout:.0f}s; "
                f"force it with: kill -9 {pid}"
            )
        time.sleep(0.1)
    click.echo(f"speclora daemon stopped (pid {pid})")


@daemon_group.command(
    epilog="Asks the daemon at --address (default: the local socket) for its health and "
    "statistics; `start` and `stop` act on this machine's daemon process only."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@address_option
@click.pass_context
def status(ctx: click.Context, as_json: bool, address: str | None) -> None:
    """Say whether the daemon runs, where, and what it serves."""
    import json

    paths = resolve_paths()
    with client_errors():
        client = SpecLoRAClient(
            address, config_path=ctx.obj.get("config_path"), connect_timeout=1.0
        )
        local = client.address.startswith("unix:")
        with client:
            try:
                health = client.health()
                snap = client.stats()
            except DaemonNotRunning:
                if not local or not running_pid(paths):
                    raise
                health, snap = "NOT_RESPONDING", None  # holds the lock but does not answer
    pid = snap.pid if snap is not None and snap.pid else running_pid(paths)
    info: dict[str, object] = {
        "running": True,
        "pid": pid,
        "address": client.address,
        "health": health,
    }
    if local:
        info["log"] = str(paths.daemon_log)
    if snap is not None:
        info.update(
            target=snap.target_model,
            draft=snap.draft_model,
            adapter=snap.adapter_version,
            uptime_s=snap.uptime_s,
            version=snap.version,
        )
    if as_json:
        click.echo(json.dumps(info))
    else:
        click.echo(f"speclora daemon is running (pid {pid}) on {client.address}: {health}")
        if snap is not None:
            click.echo(
                f"  target {snap.target_model}, draft {snap.draft_model or 'none'}, adapter "
                f"{snap.adapter_version or 'none'}, up {human_duration(snap.uptime_s)}"
            )
        if local:
            click.echo(f"  logs: {paths.daemon_log}")
    if health != "SERVING":
        sys.exit(EXIT_NOT_RUNNING)
