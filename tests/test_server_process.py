"""The daemon as a real process: `speclora serve` and the CLI end to end, single instance,
SIGTERM during a stream, `daemon start|stop|status`, file modes. Tiny models, self:2 draft."""

from __future__ import annotations

import json
import signal
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.daemons import Proc, daemon_env, log_events, run_cli, socket_path, start_daemon
from speclora.client.stub import (
    DaemonNotRunning,
    DaemonShuttingDown,
    GenerationSummary,
    SpecLoRAClient,
    TextChunk,
)
from speclora.daemon import blas, memory

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def daemon(tiny_target_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    home = tmp_path_factory.mktemp("proc")
    env = daemon_env(home, tiny_target_path)
    log = home / "serve.log"
    proc = start_daemon(env, home, log)
    yield Proc(proc, home, env, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_cli_generate_json(daemon: Proc) -> None:
    result = run_cli(
        daemon.env, "generate", "Explain quantum computing simply.", "--max-tokens", "12", "--json"
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    for key in (
        "text",
        "token_ids",
        "from_draft",
        "proposed",
        "accepted",
        "acceptance_rate",
        "tokens_per_second",
        "finish_reason",
        "adapter_version",
        "failure_recorded",
    ):
        assert key in out, key
    assert len(out["token_ids"]) == len(out["from_draft"]) == out["completion_tokens"]
    assert out["finish_reason"] in ("eos", "length")


def test_cli_generate_streams_text_and_reports_on_stderr(daemon: Proc) -> None:
    result = run_cli(
        daemon.env, "generate", "Hello", "--max-tokens", "6", "--temperature", "0.7", "--seed", "1"
    )
    assert result.returncode == 0, result.stderr
    assert "tokens" in result.stderr and "tok/s" in result.stderr
    bad = run_cli(daemon.env, "generate", "Hello", "--top-p", "0")
    assert bad.returncode == 1 and "top_p" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_stats_and_status(daemon: Proc) -> None:
    result = run_cli(daemon.env, "stats", "--json")
    assert result.returncode == 0, result.stderr
    snap = json.loads(result.stdout)
    assert snap["target_model"] == "tiny-target" and snap["draft_model"] == "tiny-target[self:2]"
    human = run_cli(daemon.env, "stats")
    assert "acceptance" in human.stdout and human.returncode == 0
    status = run_cli(daemon.env, "daemon", "status")
    assert status.returncode == 0 and f"pid {daemon.proc.pid}" in status.stdout
    assert "SERVING" in status.stdout


def test_cli_interactive_session(daemon: Proc) -> None:
    result = run_cli(
        daemon.env,
        "interactive",
        "--max-tokens",
        "5",
        stdin="Hello\n/stats\n/reset\n/nope\n/exit\n",
    )
    assert result.returncode == 0, result.stderr
    assert "target      tiny-target" in result.stdout
    assert "(conversation cleared)" in result.stdout
    assert "unknown command /nope" in result.stdout
    assert "tokens" in result.stdout  # the reply's summary line


def test_socket_and_directory_modes(daemon: Proc) -> None:
    sock = socket_path(daemon.home)
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700


def test_daemon_tunes_malloc_and_loads_no_grammar_engine_until_asked(daemon: Proc) -> None:
    """Startup memory: glibc is told to give freed buffers back (memory.tune_malloc, before any
    model loads), and llguidance (structured output) stays unloaded through unconstrained
    requests: only a request with a grammar needs it."""
    (start,) = log_events(daemon.log, "daemon_starting")
    if memory._mallopt() is not None:
        threshold = memory.mmap_threshold(blas.per_product_scratch_bytes())
        assert start["malloc"] == {
            "mmap_threshold": threshold,
            "trim_threshold": 2 * threshold,
            "arena_max": memory.ARENA_MAX,
        }
    with daemon.client() as client:
        assert client.generate_text("Hi", max_tokens=4) is not None
    maps = Path(f"/proc/{daemon.proc.pid}/maps")
    if maps.exists():
        assert "llguidance" not in maps.read_text()


def test_second_instance_is_refused_and_the_first_keeps_serving(daemon: Proc) -> None:
    second = run_cli(daemon.env, "serve", timeout=60)
    assert second.returncode != 0
    assert f"already running (pid {daemon.proc.pid})" in second.stderr
    assert "Traceback" not in second.stderr
    with daemon.client() as client:
        assert client.health() == "SERVING"
        assert client.generate_text("Hi", max_tokens=3) is not None


def test_sigterm_during_a_stream_exits_zero(tiny_target_path: Path, tmp_path: Path) -> None:
    home = tmp_path / "h"
    env = daemon_env(home, tiny_target_path, SPECLORA_SERVER_SHUTDOWN_GRACE_S="1")
    log = tmp_path / "serve.log"
    proc = start_daemon(env, home, log)
    events: list[object] = []
    errors: list[Exception] = []
    first = threading.Event()

    def stream() -> None:
        try:
            with SpecLoRAClient(str(socket_path(home))) as client:
                for event in client.generate("Explain quantum computing simply.", max_tokens=2000):
                    events.append(event)
                    first.set()
        except Exception as exc:  # collected and asserted below
            errors.append(exc)
            first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(60)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert time.monotonic() - started < 1 + 5  # grace plus margin
    reader.join(10)
    # The stream either finished (its summary says why) or got a clean UNAVAILABLE.
    if errors:
        assert isinstance(errors[0], DaemonShuttingDown | DaemonNotRunning), errors
    else:
        assert isinstance(events[-1], GenerationSummary)
        assert events[-1].finish_reason in ("cancelled", "length", "eos")
        assert any(isinstance(e, TextChunk) for e in events)
    assert not socket_path(home).exists()
    text = log.read_text()
    assert "shutdown_started" in text and "daemon_exited" in text


def test_daemon_start_status_stop(tiny_target_path: Path, tmp_path: Path) -> None:
    home = tmp_path / "h"
    env = daemon_env(home, tiny_target_path)
    started = run_cli(env, "daemon", "start", timeout=180)
    try:
        assert started.returncode == 0, started.stderr + started.stdout
        assert "speclora daemon started (pid" in started.stdout
        assert str(socket_path(home)) in started.stdout
        pid = int(started.stdout.split("(pid ")[1].split(")")[0])
        again = run_cli(env, "daemon", "start")
        assert again.returncode == 0 and f"already running (pid {pid})" in again.stdout
        assert run_cli(env, "generate", "Hi", "--max-tokens", "3").returncode == 0
        assert (home / "logs" / "daemon.log").read_text()
    finally:
        stopped = run_cli(env, "daemon", "stop", timeout=60)
    assert stopped.returncode == 0 and f"stopped (pid {pid})" in stopped.stdout
    status = run_cli(env, "daemon", "status")
    assert status.returncode == 2
    assert "not running" in status.stderr and "speclora daemon start" in status.stderr
    assert not socket_path(home).exists()
