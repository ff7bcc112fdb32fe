"""Shutdown: SIGTERM to a real `speclora serve` with four open streams, a stats watcher and a
health watcher. It exits 0 within the grace period; every client gets a finished stream or a
clean UNAVAILABLE; health turns NOT_SERVING first and its Watch then ends cleanly; new calls are
refused at once; the socket is gone; and a restart on the same files serves again."""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.daemons import daemon_env, local_daemon, socket_path, start_daemon, wait_until
from speclora.daemon.server import SERVICE_NAME
from speclora.shared.paths import resolve_paths
from speclora.shared.pb import speclora_pb2 as pb
from speclora.shared.pb import speclora_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

GRACE_S = 2.0
# Two streams that outlast the grace period and two that may finish inside it.
STREAM_TOKENS = (2000, 2000, 120, 40)


@dataclass
class Stream:
    max_tokens: int
    events: list[pb.GenerateEvent] = field(default_factory=list)
    error: grpc.RpcError | None = None
    started: threading.Event = field(default_factory=threading.Event)

    def run(self, stub: pb_grpc.SpecLoRAStub) -> None:
        request = pb.GenerateRequest(
            prompt="Explain quantum computing.", max_tokens=self.max_tokens
        )
        try:
            for event in stub.Generate(request, timeout=60):
                self.events.append(event)
                self.started.set()
        except grpc.RpcError as err:
            self.error = err
            self.started.set()

    def problem(self) -> str | None:
        """None for a clean ending: a finished stream, or UNAVAILABLE."""
        if self.error is not None:
            if self.error.code() == grpc.StatusCode.UNAVAILABLE:
                return None
            return f"{self.error.code().name}: {self.error.details()}"
        if not self.events or not self.events[-1].HasField("summary"):
            return "the stream ended without a summary or an error"
        tokens = sum(len(e.chunk.token_ids) for e in self.events[:-1])
        if tokens != self.events[-1].summary.completion_tokens:
            return f"summary says {self.events[-1].summary.completion_tokens}, streamed {tokens}"
        return None


def test_sigterm_with_open_streams_exits_cleanly_and_restarts(
    tiny_target_path: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    env = daemon_env(home, tiny_target_path, SPECLORA_SERVER_SHUTDOWN_GRACE_S=str(GRACE_S))
    log = tmp_path / "serve.log"
    proc = start_daemon(env, home, log)
    channel = grpc.insecure_channel(f"unix:{socket_path(home)}")
    stub = pb_grpc.SpecLoRAStub(channel)

    streams = [Stream(n) for n in STREAM_TOKENS]
    threads = [threading.Thread(target=s.run, args=(stub,)) for s in streams]
    for t in threads:
        t.start()
    for s in streams:
        assert s.started.wait(30)
    watcher = stub.Stats(pb.StatsRequest(watch=True, interval_s=0.2), timeout=60)
    next(watcher)
    health = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=60
    )
    assert next(health).status == health_pb2.HealthCheckResponse.SERVING

    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    # Supervisors watching health see NOT_SERVING while the streams drain.
    assert next(health).status == health_pb2.HealthCheckResponse.NOT_SERVING
    # New work is refused at once, not queued behind the drain.
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(prompt="late", max_tokens=2), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - t0 < 1.0
    # The watcher ends with UNAVAILABLE (shutting down), not a hang.
    with pytest.raises(grpc.RpcError) as err:
        for _snapshot in watcher:
            pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    assert proc.wait(GRACE_S + 10) == 0
    exit_s = time.monotonic() - started
    # The health Watch ends cleanly at exit (not CANCELLED after grpc's stop margin).
    assert [r.status for r in health] in ([], [health_pb2.HealthCheckResponse.NOT_SERVING])
    # The grace period, plus a little for the last summaries and the exit on a busy machine.
    assert exit_s < GRACE_S + 2.0, f"exited {exit_s:.1f} s after SIGTERM (grace {GRACE_S} s)"
    for t in threads:
        t.join(10)
    problems = [p for s in streams if (p := s.problem())]
    assert not problems, problems
    channel.close()
    paths = resolve_paths(env)
    assert not socket_path(home).exists()
    assert paths.lock_file.read_text() == ""  # no stale pid for `daemon stop` to kill

    # A restart on the same files serves again.
    proc = start_daemon(env, home, log)
    with grpc.insecure_channel(f"unix:{socket_path(home)}") as channel:
        again = pb_grpc.SpecLoRAStub(channel)
        events = list(again.Generate(pb.GenerateRequest(prompt="Hi", max_tokens=3), timeout=30))
        assert events[-1].HasField("summary")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    wait_until(lambda: not socket_path(home).exists(), timeout=5)

    finished = [s for s in streams if s.error is None]
    reasons = [pb.FinishReason.Name(s.events[-1].summary.finish_reason) for s in finished]
    print(
        f"\nSIGTERM with {len(streams)} open streams: exit 0 after {exit_s:.1f} s "
        f"(grace {GRACE_S} s); {len(finished)} finished ({', '.join(reasons)}), "
        f"{len(streams) - len(finished)} UNAVAILABLE; restart served"
    )


def test_a_stream_cut_at_shutdown_still_adds_up(
    tiny_paths: tuple[Path, Path], tmp_path: Path
) -> None:
    """A stream ended by shutdown gets a summary whose tokens are exactly the ones streamed,
    including any the engine was still holding back (a partial character, or text that could
    still grow into a stop string). Here the stop string is the greedy completion itself plus
    a character that never comes, so the engine holds back everything until the end."""
    d = local_daemon(
        tmp_path / "home",
        {
            "models": {"target": str(tiny_paths[0]), "draft": str(tiny_paths[1])},
            "generation": {"max_stop_string_chars": 65_536},
        },
        learning=False,
    )
    try:
        request = pb.GenerateRequest(prompt="Explain quantum computing.", max_tokens=400)
        full = list(d.stub.Generate(request, timeout=60))
        request.stop.append("".join(e.chunk.text for e in full[:-1]) + "\0")
        call = d.stub.Generate(request, timeout=60)
        wait_until(lambda: d.worker.active_count == 1, what="generation running")
        time.sleep(0.2)  # a few dozen steps, all of them held back
        d.server.shutdown(0)
        events = list(call)
    finally:
        d.close()
    summary = events[-1].summary
    assert summary.finish_reason == pb.FINISH_REASON_CANCELLED, "finished before the shutdown"
    streamed = [t for e in events[:-1] for t in e.chunk.token_ids]
    assert 0 < summary.completion_tokens < full[-1].summary.completion_tokens
    assert len(streamed) == summary.completion_tokens, "tokens held back were never streamed"
