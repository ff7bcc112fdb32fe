"""Real daemons for tests: a server in this process on a temporary socket, or `speclora serve`
as a subprocess. Both use the tiny models, so a daemon is up in about a second (in-process) or a
few seconds (subprocess, mostly imports)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from speclora.client.stub import DaemonNotRunning, SpecLoRAClient
from speclora.daemon.runtime import Runtime, build_hub, build_runtime
from speclora.daemon.server import SERVICE_NAME, DaemonServer, create_server
from speclora.daemon.worker import Worker
from speclora.shared.config import Config, load_config
from speclora.shared.paths import Paths, resolve_paths
from speclora.shared.pb import speclora_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    """Poll `predicate` until it is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not reached within {timeout} s: {what or predicate}"
        time.sleep(0.01)


# ---------------------------------------------------------------------- in-process


@dataclass
class LocalDaemon:
    """A real gRPC server in this process, plus a channel and stub to it."""

    config: Config
    paths: Paths
    worker: Worker
    server: DaemonServer
    address: str
    channel: grpc.Channel
    stub: pb_grpc.SpecLoRAStub
    runtime: Runtime | None = None

    def health(self, service: str = SERVICE_NAME) -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def raw_stream(self, method: str) -> grpc.UnaryStreamMultiCallable:
        """A server-streaming call that sends and receives raw bytes (identity serializers)."""
        return self.channel.unary_stream(
            f"/{SERVICE_NAME}/{method}", request_serializer=None, response_deserializer=None
        )

    def close(self, grace_s: float = 1.0) -> None:
        self.channel.close()
        self.server.shutdown(grace_s)
        if self.runtime is not None:
            self.runtime.close()
        else:
            self.worker.stop()


# Test daemons' HTTP APIs take a free port: the default (8421) may be a real daemon's, or another
# test's running at the same time.
TEST_HTTP_ADDRESS = "127.0.0.1:0"


def local_config(home: Path, overrides: Mapping[str, Any]) -> tuple[Config, Paths]:
    env = {"SPECLORA_HOME": str(home)}
    overrides = {
        **overrides,
        "server": {"http_address": TEST_HTTP_ADDRESS, **overrides.get("server", {})},
    }
    return load_config(env=env, overrides=overrides), resolve_paths(env)


def local_daemon(home: Path, overrides: Mapping[str, Any], *, learning: bool = True) -> LocalDaemon:
    """Build and start a daemon under `home`. With `learning` it is what `serve` runs (failure
    store, recorder, adapters); without, a bare worker (Train is FAILED_PRECONDITION)."""
    config, paths = local_config(home, overrides)
    runtime = build_runtime(config, paths) if learning else None
    worker = runtime.worker if runtime else Worker(build_hub(config), config).start()
    server, address = create_server(
        config, worker, learning=runtime.learning if runtime else None, paths=paths
    )
    server.start()
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.SpecLoRAStub(channel)
    return LocalDaemon(config, paths, worker, server, address, channel, stub, runtime)


# ---------------------------------------------------------------------- subprocess


def daemon_env(home: Path, target: Path, draft: str = "self:2", **extra: str) -> dict[str, str]:
    """The environment for `speclora serve` and the CLI: everything under `home`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECLORA_")}
    env.update(
        SPECLORA_HOME=str(home),
        SPECLORA_MODELS_TARGET=str(target),
        SPECLORA_MODELS_DRAFT=draft,
        SPECLORA_SERVER_HTTP_ADDRESS=TEST_HTTP_ADDRESS,
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    if "SPECLORA_BLAS_PATH" in os.environ:
        env["SPECLORA_BLAS_PATH"] = os.environ["SPECLORA_BLAS_PATH"]
    return env


def socket_path(home: Path) -> Path:
    return home / "state" / "run" / "speclora.sock"


def run_cli(
    env: dict[str, str], *args: str, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "speclora", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


SERVE = (sys.executable, "-m", "speclora", "serve")


def launch_daemon(
    env: dict[str, str], log: Path, command: Sequence[str] = SERVE, umask: int | None = None
) -> subprocess.Popen[bytes]:
    """Start `command` (by default `speclora serve`) with its output appended to `log`."""
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    with open(log, "ab") as out:
        return subprocess.Popen(list(command), env=env, stdout=out, stderr=out, preexec_fn=preexec)


def wait_serving(
    proc: subprocess.Popen[bytes], home: Path, log: Path, timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"daemon exited early:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"daemon did not start:\n{log.read_text()}"
        try:
            with SpecLoRAClient(str(socket_path(home)), connect_timeout=0.5) as client:
                if client.health() == "SERVING":
                    return
        except DaemonNotRunning:
            pass
        time.sleep(0.1)


def start_daemon(
    env: dict[str, str],
    home: Path,
    log: Path,
    command: Sequence[str] = SERVE,
    umask: int | None = None,
) -> subprocess.Popen[bytes]:
    """Start a daemon and wait until its health check says SERVING."""
    proc = launch_daemon(env, log, command, umask)
    wait_serving(proc, home, log)
    return proc


class Proc:
    """A running `speclora serve` subprocess and how to reach it."""

    def __init__(self, proc: subprocess.Popen[bytes], home: Path, env: dict[str, str], log: Path):
        self.proc, self.home, self.env, self.log = proc, home, env, log

    def client(self) -> SpecLoRAClient:
        return SpecLoRAClient(str(socket_path(self.home)))


def log_events(log: Path, event: str | None = None) -> list[dict[str, Any]]:
    """The daemon's JSON log lines (it logs JSON when not on a TTY), optionally one event."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and (event is None or record.get("event") == event):
            out.append(record)
    return out
