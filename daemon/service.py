"""Run the daemon as a user service: a launchd agent on macOS, a systemd user unit on Linux.

The templates live in `service_templates/` (installed with the package; `launchd/` in the repo
links to them). Installing fills them in with this environment's python (so the service runs
the same install as the CLI), the log file, the environment and a stop timeout above the
daemon's shutdown grace, then asks launchctl/systemctl to load and start it. No MLX here.
"""

from __future__ import annotations

import math
import os
import plistlib
import shutil
import string
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from speclora.daemon.errors import SpecLoRAError
from speclora.shared.paths import Paths

LABEL = "com.speclora.daemon"
UNIT = "speclora.service"
PLIST_TEMPLATE = "com.speclora.daemon.plist"
# Seconds launchd/systemd wait after SIGTERM beyond the daemon's own grace period.
STOP_MARGIN_S = 10


class ServiceError(SpecLoRAError):
    """The service manager is missing or refused; the message says what to do."""


@dataclass(frozen=True)
class ServiceSpec:
    """What the service runs and with which environment."""

    python: str
    config_path: str | None
    log_file: Path
    shutdown_grace_s: float
    path_env: str
    speclora_home: str | None

    @property
    def program_arguments(self) -> list[str]:
        args = [self.python, "-m", "speclora"]
        if self.config_path:
            args += ["--config", self.config_path]
        return [*args, "serve"]

    @property
    def stop_timeout_s(self) -> int:
        return math.ceil(self.shutdown_grace_s) + STOP_MARGIN_S


def make_spec(
    paths: Paths,
    shutdown_grace_s: float,
    config_path: str | None = None,
    env: dict[str, str] | None = None,
) -> ServiceSpec:
    env = dict(os.environ if env is None else env)
    return ServiceSpec(
        python=sys.executable,
        config_path=str(Path(config_path).absolute()) if config_path else None,
        log_file=paths.daemon_log,
        shutdown_grace_s=shutdown_grace_s,
        # The venv's bin first, so tools the daemon runs (pip for the embedded model) match it.
        path_env=os.pathsep.join(
            dict.fromkeys([str(Path(sys.executable).parent), *env.get("PATH", "").split(":")])
        ).strip(os.pathsep),
        speclora_home=env.get("SPECLORA_HOME") or None,
    )


def _template(name: str) -> str:
    return resources.files("speclora.daemon").joinpath("service_templates", name).read_text()


# ---------------------------------------------------------------------- launchd


def render_plist(spec: ServiceSpec) -> bytes:
    """The agent plist: the template parsed, its @...@ values replaced, written back."""
    values: dict[str, Any] = {
        "@PYTHON@": spec.python,
        "@EXIT_TIMEOUT@": spec.stop_timeout_s,
        "@LOG_FILE@": str(spec.log_file),
        "@PATH@": spec.path_env,
        "@SPECLORA_HOME@": spec.speclora_home,
    }
    config_args = ["--config", spec.config_path] if spec.config_path else []

    def fill(node: Any) -> Any:
        if isinstance(node, dict):
            filled = {k: fill(v) for k, v in node.items()}
            return {k: v for k, v in filled.items() if v is not None}  # unset env: no key
        if isinstance(node, list):
            out: list[Any] = []
            for item in node:
                out.extend(config_args if item == "@CONFIG_ARGS@" else [fill(item)])
            return out
        return values.get(node, node) if isinstance(node, str) else node

    plist = fill(plistlib.loads(_template(PLIST_TEMPLATE).encode()))
    return plistlib.dumps(plist)


# ---------------------------------------------------------------------- systemd


def _systemd_quote(value: str) -> str:
    # systemd expands % specifiers and $ variables; double them, quote whitespace.
    value = value.replace("%", "%%").replace("$", "$$")
    if value and not any(c in value for c in " \t\"'\\"):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_unit(spec: ServiceSpec) -> str:
    env = {"PATH": spec.path_env, "PYTHONUNBUFFERED": "1"}
    if spec.speclora_home:
        env["SPECLORA_HOME"] = spec.speclora_home
    return string.Template(_template(UNIT)).substitute(
        exec_start=" ".join(_systemd_quote(a) for a in spec.program_arguments),
        environment="\n".join(f"Environment={_systemd_quote(f'{k}={v}')}" for k, v in env.items()),
        stop_timeout=spec.stop_timeout_s,
    )


# ---------------------------------------------------------------------- managers


def _run(command: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    if shutil.which(command[0]) is None:
        raise ServiceError(
            f"{command[0]} was not found; this system cannot run SpecLoRA as a service. "
            "Run it with `speclora daemon start` instead"
        )
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise ServiceError(f"`{' '.join(command)}` failed ({result.returncode}): {detail}")
    return result


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Launchd:
    """macOS: a launchd agent in the user's GUI domain."""

    name = "launchd"

    def __init__(self, home: Path) -> None:
        self.file = home / "Library" / "LaunchAgents" / f"{LABEL}.plist"
        self.domain = f"gui/{os.getuid()}"

    def install(self, spec: ServiceSpec) -> list[str]:
        spec.log_file.parent.mkdir(parents=True, exist_ok=True)
        _write(self.file, render_plist(spec))
        _run(["launchctl", "bootout", f"{self.domain}/{LABEL}"], check=False)  # a previous one
        _run(["launchctl", "bootstrap", self.domain, str(self.file)])
        return [f"wrote {self.file}", f"loaded {LABEL} into {self.domain}; it starts at login"]

    def uninstall(self) -> list[str]:
        if not self.file.exists():
            return [f"{LABEL} is not installed ({self.file} does not exist)"]
        _run(["launchctl", "bootout", f"{self.domain}/{LABEL}"], check=False)
        self.file.unlink()
        return [f"unloaded {LABEL}", f"removed {self.file}"]

    def status(self) -> tuple[bool, str]:
        result = _run(["launchctl", "print", f"{self.domain}/{LABEL}"], check=False)
        loaded = result.returncode == 0
        return loaded, (result.stdout if loaded else f"{LABEL} is not loaded") + (
            "" if self.file.exists() else f"\n{self.file} does not exist (not installed)"
        )

    def logs_command(self, log_file: Path, lines: int, follow: bool) -> list[str]:
        return ["tail", "-n", str(lines), *(["-F"] if follow else []), str(log_file)]


class Systemd:
    """Linux: a systemd --user unit."""

    name = "systemd"

    def __init__(self, config_home: Path) -> None:
        self.file = config_home / "systemd" / "user" / UNIT

    def install(self, spec: ServiceSpec) -> list[str]:
        _write(self.file, render_unit(spec).encode())
        _run(["systemctl", "--user", "daemon-reload"])
        _run(["systemctl", "--user", "enable", "--now", UNIT])
        return [
            f"wrote {self.file}",
            f"enabled and started {UNIT} (it starts with your user session)",
            "to keep it running after logout: loginctl enable-linger $USER",
        ]

    def uninstall(self) -> list[str]:
        if not self.file.exists():
            return [f"{UNIT} is not installed ({self.file} does not exist)"]
        _run(["systemctl", "--user", "disable", "--now", UNIT], check=False)
        self.file.unlink()
        _run(["systemctl", "--user", "daemon-reload"], check=False)
        return [f"stopped and disabled {UNIT}", f"removed {self.file}"]

    def status(self) -> tuple[bool, str]:
        result = _run(["systemctl", "--user", "status", UNIT], check=False)
        return result.returncode == 0, (result.stdout or result.stderr).rstrip()

    def logs_command(self, log_file: Path, lines: int, follow: bool) -> list[str]:
        return ["journalctl", "--user", "-u", UNIT, "-n", str(lines), *(["-f"] if follow else [])]


def manager_for(
    platform: str | None = None, env: dict[str, str] | None = None
) -> Launchd | Systemd:
    """The service manager for `platform` ("launchd", "systemd"; None = this system's)."""
    env = dict(os.environ if env is None else env)
    home = Path(env.get("HOME") or Path.home())
    platform = platform or ("launchd" if sys.platform == "darwin" else "systemd")
    if platform == "launchd":
        return Launchd(home)
    if platform == "systemd":
        return Systemd(Path(env.get("XDG_CONFIG_HOME") or home / ".config"))
    raise ServiceError(f"unknown service platform {platform!r} (launchd or systemd)")
