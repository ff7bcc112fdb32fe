"""Where the client finds the daemon: an address and, for TCP, a token. Nothing else.

The client never loads the daemon's configuration: a key added by a newer daemon, or a
mistyped `SPECLORA_*` variable meant for the daemon, must not break a program that only wants
to talk to it. It reads, in order (first found wins):

- address: the caller's, `SPECLORA_ADDRESS`, `SPECLORA_SERVER_SOCKET_PATH`, the config file's
  `server.socket_path`, else the state dir's socket (as the daemon computes it);
- token (TCP only): the caller's, `SPECLORA_TOKEN`, the file `SPECLORA_TOKEN_FILE` names, else
  `<data dir>/token` (the file the daemon writes).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from speclora.shared.config import config_file_path
from speclora.shared.paths import daemon_socket_path, resolve_paths


class ClientConfigError(ValueError):
    """The config file cannot be read for the one key the client uses."""


@dataclass(frozen=True)
class ClientSettings:
    address: str  # "unix:/path" or "host:port"
    token: str | None  # sent on TCP only

    @property
    def tcp(self) -> bool:
        return not self.address.startswith("unix:")


def normalise_address(address: str) -> str:
    """ "/path", "./path", "~/path" and "unix:/path" are sockets; anything else is host:port."""
    if address.startswith("unix:"):
        return address
    if address.startswith(("/", "./", "~")):
        return f"unix:{Path(address).expanduser().absolute()}"
    return address


def _configured_socket(config_path: str | os.PathLike | None, env: Mapping[str, str]) -> Any:
    """`server.socket_path` from the config file, reading nothing else in it."""
    file = config_file_path(config_path, env)
    if file is None:
        return None
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except OSError as exc:
        raise ClientConfigError(f"cannot read config file {file}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ClientConfigError(f"{file}: invalid YAML: {exc}") from None
    server = data.get("server") if isinstance(data, dict) else None
    value = server.get("socket_path") if isinstance(server, dict) else None
    if value is not None and not isinstance(value, str):
        raise ClientConfigError(f"{file}: server.socket_path must be a path, got {value!r}")
    return value


def read_token(env: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if env is None else env
    if env.get("SPECLORA_TOKEN"):
        return env["SPECLORA_TOKEN"].strip() or None
    path = Path(env["SPECLORA_TOKEN_FILE"]) if env.get("SPECLORA_TOKEN_FILE") else None
    try:
        return (path or resolve_paths(dict(env)).token_file).read_text().strip() or None
    except OSError:
        return None


def resolve_settings(
    address: str | None = None,
    *,
    config_path: str | os.PathLike | None = None,
    token: str | None = None,
    env: Mapping[str, str] | None = None,
) -> ClientSettings:
    env = os.environ if env is None else env
    address = address or env.get("SPECLORA_ADDRESS") or None
    if address:
        resolved = normalise_address(address)
    else:
        socket = env.get("SPECLORA_SERVER_SOCKET_PATH") or _configured_socket(config_path, env)
        resolved = f"unix:{daemon_socket_path(socket, resolve_paths(dict(env)))}"
    tcp = not resolved.startswith("unix:")
    return ClientSettings(resolved, token or (read_token(env) if tcp else None))
