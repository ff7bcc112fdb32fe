"""Load through the real server: 8 clients x 20 mixed requests beside stats watchers, about 10%
cancelled at random points; then the bounds: a full queue and a full server answer
RESOURCE_EXHAUSTED at once, and cancelled streams give their slots back at once.
Run with -s to see the figures.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from helpers.checks import usage, wait_idle
from helpers.daemons import SERVING, LocalDaemon, local_daemon, wait_until
from speclora.shared.pb import speclora_pb2 as pb
from speclora.shared.pb import speclora_pb2_grpc as pb_grpc

CLIENTS = 8
REQUESTS_PER_CLIENT = 20
CANCEL_FRACTION = 0.1
WATCHERS = 2
MAX_ACTIVE = 4
PROMPTS = [
    "Explain quantum computing simply.",
    "Write a haiku about the sea.",
    "def add(a, b):",
    "Paris is the capital of",
    "1 2 3 4 5",
]
FINISHED = (pb.FINISH_REASON_EOS, pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP_STRING)


@pytest.fixture(scope="module")
def daemon(
    tiny_paths: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalDaemon]:
    d = local_daemon(
        tmp_path_factory.mktemp("load"),
        {
            "models": {"target": str(tiny_paths[0]), "draft": str(tiny_paths[1])},
            "server": {"max_active": MAX_ACTIVE, "queue_size": 32},
            "generation": {"max_tokens": 16, "max_tokens_cap": 64},
            "learning": {"failure_threshold": 0.5},
        },
    )
    yield d
    d.close()


def random_request(rng: random.Random) -> pb.GenerateRequest:
    request = pb.GenerateRequest(
        max_tokens=rng.randint(1, 24),
        mode=rng.choice([pb.MODE_UNSPECIFIED, pb.MODE_DETAILED, pb.MODE_FAST]),
        temperature=rng.choice([0.0, 0.0, 0.7, 1.0]),
        seed=rng.randint(0, 2**31),
    )
    if rng.random() < 0.2:
        request.messages.add(role="system", content="Be brief.")
        request.messages.add(role="user", content=rng.choice(PROMPTS))
    else:
        request.prompt = rng.choice(PROMPTS)
        request.raw = rng.random() < 0.2
    if rng.random() < 0.5:
        request.draft_tokens = rng.choice([0, 1, 4, 8])
    if rng.random() < 0.3:
        request.record = rng.random() < 0.5
    if rng.random() < 0.2:
        request.stop.append(rng.choice(["e", "the", "\n"]))
    return request


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)

    def add(self, outcome: str, problem: str | None = None) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if problem:
                self.unexpected.append(problem)


def run_client(address: str, seed: int, tally: Tally) -> None:
    rng = random.Random(seed)
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.SpecLoRAStub(channel)
    try:
        for _ in range(REQUESTS_PER_CLIENT):
            request = random_request(rng)
            cancel_after = rng.randint(0, 3) if rng.random() < CANCEL_FRACTION else None
            call = stub.Generate(request, timeout=120)
            if cancel_after == 0:  # at a random instant, maybe before the first chunk
                threading.Timer(rng.uniform(0, 0.02), call.cancel).start()
            events: list[pb.GenerateEvent] = []
            try:
                for event in call:
                    events.append(event)
                    if cancel_after and len(events) == cancel_after:
                        call.cancel()
            except grpc.RpcError as err:
                if cancel_after is not None and err.code() == grpc.StatusCode.CANCELLED:
                    tally.add("cancelled")
                else:
                    tally.add("error", f"{err.code().name}: {err.details()}")
                continue
            tally.add("served", check_stream(events))
    finally:
        channel.close()


def check_stream(events: list[pb.GenerateEvent]) -> str | None:
    """A completed stream: chunks, then exactly one summary that accounts for them."""
    if not events or not events[-1].HasField("summary"):
        return "a stream ended without a summary"
    if any(e.HasField("summary") for e in events[:-1]):
        return "a summary before the end of the stream"
    summary = events[-1].summary
    tokens = sum(len(e.chunk.token_ids) for e in events[:-1])
    if tokens != summary.completion_tokens or summary.finish_reason not in FINISHED:
        return f"summary does not match the stream: {tokens} tokens, {summary}"
    return None


def run_watcher(stub: pb_grpc.SpecLoRAStub, stop: threading.Event, tally: Tally) -> None:
    call = stub.Stats(pb.StatsRequest(watch=True, interval_s=0.1), timeout=300)
    threading.Thread(target=lambda: (stop.wait(), call.cancel()), daemon=True).start()
    try:
        for _snapshot in call:
            tally.add("snapshot")
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.CANCELLED:
            tally.add("error", f"watcher: {err.code().name}: {err.details()}")


@pytest.mark.slow
def test_eight_clients_with_watchers_and_cancellations(daemon: LocalDaemon) -> None:
    list(daemon.stub.Generate(pb.GenerateRequest(prompt="warm up", max_tokens=4), timeout=60))
    wait_idle(daemon)
    before = usage(daemon)
    requests_before = daemon.worker.stats.snapshot().requests_total
    tally = Tally()
    stop = threading.Event()
    watchers = [
        threading.Thread(target=run_watcher, args=(daemon.stub, stop, tally))
        for _ in range(WATCHERS)
    ]
    clients = [
        threading.Thread(target=run_client, args=(daemon.address, seed, tally))
        for seed in range(CLIENTS)
    ]
    started = time.monotonic()
    for t in watchers + clients:
        t.start()
    for t in clients:
        t.join(300)
    elapsed = time.monotonic() - started
    stop.set()
    for t in watchers:
        t.join(30)
    assert not any(t.is_alive() for t in watchers + clients)

    assert not tally.unexpected, "\n".join(tally.unexpected[:20])
    total = CLIENTS * REQUESTS_PER_CLIENT
    assert tally.outcomes["served"] + tally.outcomes["cancelled"] == total
    assert tally.outcomes["cancelled"] > 0 and tally.outcomes["snapshot"] > 0

    # Afterwards the worker is idle and holds nothing for the finished or cancelled requests.
    wait_idle(daemon)
    snap = next(iter(daemon.stub.Stats(pb.StatsRequest(), timeout=10)))
    assert snap.requests_active == 0 and snap.queue_depth == 0
    assert snap.requests_total - requests_before >= tally.outcomes["served"]
    after = usage(daemon)
    assert after.kv_caches == 0, after.growth_since(before)
    assert after.mlx_active_bytes <= before.mlx_active_bytes + (1 << 20), after.growth_since(before)
    # The server's pool keeps a thread per RPC that ran at once, never one per request.
    peak_rpcs = CLIENTS + WATCHERS
    assert after.threads <= before.threads + peak_rpcs + 2, after.growth_since(before)
    # ... and a new request is served promptly.
    t0 = time.monotonic()
    final = list(daemon.stub.Generate(pb.GenerateRequest(prompt="Hi", max_tokens=4), timeout=30))
    assert final[-1].HasField("summary") and time.monotonic() - t0 < 5
    assert daemon.health() == SERVING
    print(
        f"\nload: {total} requests from {CLIENTS} clients in {elapsed:.1f} s: "
        f"{tally.outcomes['served']} served, {tally.outcomes['cancelled']} cancelled, "
        f"{tally.outcomes['snapshot']} stats snapshots to {WATCHERS} watchers, "
        f"0 unexpected errors; {after.growth_since(before)}"
    )


# ---------------------------------------------------------------------- bounds


@pytest.fixture
def small(tiny_paths: tuple[Path, Path], tmp_path: Path) -> Iterator[LocalDaemon]:
    """max_active 1, queue_size 2: capacity = 1 + 2 + 32 concurrent RPCs."""
    d = local_daemon(
        tmp_path / "home",
        {
            "models": {"target": str(tiny_paths[0]), "draft": str(tiny_paths[1])},
            "server": {"max_active": 1, "queue_size": 2},
        },
        learning=False,
    )
    yield d
    d.close()


def test_past_the_queue_bound_resource_exhausted_arrives_at_once(small: LocalDaemon) -> None:
    # Hold the worker inside a call, so what is queued stays queued, deterministically.
    entered, release = threading.Event(), threading.Event()
    holder = threading.Thread(
        target=small.worker.call, args=("hold", lambda hub: (entered.set(), release.wait(60)))
    )
    holder.start()
    assert entered.wait(10)
    request = pb.GenerateRequest(prompt="Hello", max_tokens=4)
    try:
        queued = [small.stub.Generate(request, timeout=60) for _ in range(2)]
        wait_until(lambda: small.worker.queue_depth == 2, what="two requests queued")
        refused: list[float] = []

        def burst() -> None:
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                list(small.stub.Generate(request, timeout=30))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue is full (2 requests waiting" in err.value.details()
            refused.append(time.monotonic() - t0)

        threads = [threading.Thread(target=burst) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(refused) == 6 and max(refused) < 1.0, refused
    finally:
        release.set()
        holder.join(10)
    for call in queued:  # what was queued is then served normally
        assert list(call)[-1].HasField("summary")
    wait_idle(small)
    print(f"\nqueue bound: 6 refused in at most {max(refused) * 1000:.0f} ms each")


def test_cancelled_watchers_give_their_slots_back_at_once(small: LocalDaemon) -> None:
    capacity = 1 + 2 + 32
    watch = pb.StatsRequest(watch=True, interval_s=3600.0)
    for _round in range(3):  # a leak accumulates; each round must start from a clean server
        calls = [small.stub.Stats(watch, timeout=120) for _ in range(capacity)]
        for call in calls:
            next(call)
        # The server is full: one more call is refused at once, not queued.
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            next(iter(small.stub.Stats(pb.StatsRequest(), timeout=10)))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - t0 < 1.0
        for call in calls:
            call.cancel()
        # Cancelled watchers must not sit out their hour-long interval holding a slot.
        t0 = time.monotonic()
        while True:
            try:
                events = list(small.stub.Generate(pb.GenerateRequest(prompt="Hi", max_tokens=2)))
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() - t0 < 2.0, "cancelled watchers still hold their slots"
                time.sleep(0.05)
        assert events[-1].HasField("summary")
    assert usage(small).kv_caches == 0
