"""Where SpecLoRA keeps its state.

`SPECLORA_HOME` puts everything (socket, database, adapters, model cache, logs) under one
directory, which is what tests, the demo and people who want an easy reset use. Without it we
follow the platform: `~/Library/Application Support/SpecLoRA` on macOS, XDG dirs on Linux.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

APP_NAME = "speclora"

# sun_path is 108 bytes on Linux and 104 on macOS, including the trailing NUL.
MAX_SOCKET_PATH_BYTES = 103 if sys.platform == "darwin" else 107


@dataclass(frozen=True)
class Paths:
    """Every location SpecLoRA reads or writes, resolved once."""

    config_dir: Path
    data_dir: Path
    state_dir: Path
    cache_dir: Path
    log_dir: Path

    @property
    def config_file(self) -> Path:
        return self.config_dir / "config.yaml"

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    @property
    def socket_path(self) -> Path:
        return self.run_dir / "speclora.sock"

    @property
    def lock_file(self) -> Path:
        return self.run_dir / "speclora.lock"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "speclora.pid"

    @property
    def token_file(self) -> Path:
        return self.data_dir / "token"

    @property
    def database(self) -> Path:
        return self.data_dir / "failures.sqlite3"

    @property
    def history_database(self) -> Path:
        """Past requests' token ids for the history drafter (purged with the failure cases)."""
        return self.data_dir / "history.sqlite3"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def models_dir(self) -> Path:
        return self.cache_dir / "models"

    @property
    def daemon_log(self) -> Path:
        return self.log_dir / "daemon.log"


def resolve_paths(env: dict[str, str] | None = None) -> Paths:
    """Resolve paths from the environment (SPECLORA_HOME first, then the platform's dirs)."""
    env = dict(os.environ if env is None else env)
    home = env.get("SPECLORA_HOME")
    if home:
        root = Path(home).expanduser().absolute()
        return Paths(
            config_dir=root,
            data_dir=root / "data",
            state_dir=root / "state",
            cache_dir=root / "cache",
            log_dir=root / "logs",
        )
    user_home = Path(env.get("HOME") or Path.home())
    if sys.platform == "darwin":
        support = user_home / "Library" / "Application Support" / "SpecLoRA"
        return Paths(
            config_dir=support,
            data_dir=support / "data",
            state_dir=support / "state",
            cache_dir=user_home / "Library" / "Caches" / "SpecLoRA",
            log_dir=user_home / "Library" / "Logs" / "SpecLoRA",
        )

    def xdg(var: str, default: str) -> Path:
        value = env.get(var)
        return Path(value) if value else user_home / default

    return Paths(
        config_dir=xdg("XDG_CONFIG_HOME", ".config") / APP_NAME,
        data_dir=xdg("XDG_DATA_HOME", ".local/share") / APP_NAME,
        state_dir=xdg("XDG_STATE_HOME", ".local/state") / APP_NAME,
        cache_dir=xdg("XDG_CACHE_HOME", ".cache") / APP_NAME,
        log_dir=xdg("XDG_STATE_HOME", ".local/state") / APP_NAME / "logs",
    )


def daemon_socket_path(configured: str | None, paths: Paths | None = None) -> Path:
    """The daemon's Unix socket: `server.socket_path` if configured, else the state dir's.
    Daemon and client both call this, so they always agree on where to meet."""
    if configured:
        return Path(configured).expanduser().absolute()
    return (paths or resolve_paths()).socket_path.absolute()


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and parents) and make it 0700: it holds sockets, tokens and prompts."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path
