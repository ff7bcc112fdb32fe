"""Fuzz the real server: arbitrary request messages for every RPC, and raw bytes sent through
identity serializers (garbage, truncated and bit-flipped messages, unknown fields).

Every call must end OK or with a documented code (never UNKNOWN, never INTERNAL: that is a bug),
health must stay SERVING, and threads, memory and KV caches must not grow with the example
count. The example counts are bounded so the file runs in well under a minute on 2 cores.
Run with -s to see the figures.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from helpers.checks import Usage, usage, wait_idle
from helpers.daemons import SERVING, LocalDaemon, local_daemon
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from speclora.shared.pb import speclora_pb2 as pb

MESSAGE_EXAMPLES = 400
BYTES_EXAMPLES = 300
CAP = 12  # generation.max_tokens_cap: any valid request finishes quickly
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
}
METHODS = tuple(m.name for m in pb.DESCRIPTOR.services_by_name["SpecLoRA"].methods)
FUZZ_SETTINGS = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

int32 = st.integers(-(2**31), 2**31 - 1)
int64 = st.integers(-(2**63), 2**63 - 1)
float32 = st.floats(width=32)  # NaN and infinities included
small_text = st.text(max_size=24)


def optional(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.none() | strategy


def near(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Mostly values around the limits, sometimes anything."""
    return st.integers(lo - 2, hi + 2) | int32


@st.composite
def valid_generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    """Inside every limit, so the engine itself is fuzzed: odd text, stops, seeds, modes."""
    request = pb.GenerateRequest(
        max_tokens=draw(st.integers(1, CAP)),
        temperature=draw(st.floats(0, 2, width=32)),
        top_p=draw(st.floats(0.0625, 1, width=32)),
        top_k=draw(st.integers(0, 50)),
        seed=draw(st.integers(0, 2**63 - 1)),
        stop=draw(st.lists(st.text(min_size=1, max_size=6), max_size=3)),
        mode=draw(st.sampled_from([0, 1, 2])),
        record=draw(st.booleans()),
    )
    draft_tokens = draw(optional(st.integers(0, 16)))
    if draft_tokens is not None:
        request.draft_tokens = draft_tokens
    if draw(st.booleans()):
        request.prompt = draw(st.text(min_size=1, max_size=80))
        request.raw = draw(st.booleans())
    else:
        roles = st.sampled_from(["system", "user", "assistant"])
        for role, content in draw(st.lists(st.tuples(roles, small_text), min_size=1, max_size=4)):
            request.messages.add(role=role, content=content)
        request.messages.add(role="user", content=draw(small_text))
    return request


@st.composite
def wild_generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    """Anything the message can hold, mostly around the limits."""
    request = pb.GenerateRequest(
        prompt=draw(st.text(max_size=120)),
        raw=draw(st.booleans()),
        stop=draw(st.lists(st.text(max_size=8), max_size=3) | st.lists(small_text, max_size=20)),
        mode=draw(st.sampled_from([0, 1, 2]) | int32),
    )
    roles = st.sampled_from(["system", "user", "assistant"]) | small_text
    for role, content in draw(st.lists(st.tuples(roles, small_text), max_size=4)):
        request.messages.add(role=role, content=content)
    optionals = {
        "max_tokens": near(1, CAP),
        "temperature": st.floats(-0.5, 2.5) | float32,
        "top_p": st.floats(-0.5, 1.5) | float32,
        "top_k": st.integers(-2, 50) | int32,
        "seed": int64,
        "draft_tokens": near(0, 16),
        "record": st.booleans(),
    }
    for name, strategy in optionals.items():
        value = draw(optional(strategy))
        if value is not None:
            setattr(request, name, value)
    return request


@st.composite
def train_requests(draw: st.DrawFn) -> pb.TrainRequest:
    request = pb.TrainRequest(force_promote=draw(st.booleans()))
    for name, strategy in (
        ("steps", near(1, 100_000)),
        ("max_cases", near(2, 10)),
        ("learning_rate", float32),
    ):
        value = draw(optional(strategy))
        if value is not None:
            setattr(request, name, value)
    return request


@st.composite
def stats_requests(draw: st.DrawFn) -> pb.StatsRequest:
    request = pb.StatsRequest(watch=draw(st.booleans()))
    interval = draw(optional(st.floats(-1, 4000) | float32))
    if interval is not None:
        request.interval_s = interval
    return request


versions = st.sampled_from(["none", "v0001", "base", "../v0001", "/tmp", "v0001/..", ""]) | (
    st.text(max_size=70)
)
activate_requests = st.builds(pb.ActivateAdapterRequest, version=versions, rollback=st.booleans())

REQUESTS = {
    "Generate": valid_generate_requests() | wild_generate_requests(),
    "Train": train_requests(),
    "Stats": stats_requests(),
    "ActivateAdapter": activate_requests,
    "GetStats": st.just(pb.GetStatsRequest()),
    "ListAdapters": st.just(pb.ListAdaptersRequest()),
    "GetAdapter": st.builds(pb.GetAdapterRequest, version=versions),
    "RollbackAdapter": st.just(pb.RollbackAdapterRequest()),
    "ListFailureCases": st.builds(
        pb.ListFailureCasesRequest, limit=int32, before_id=st.integers(-(2**63), 2**63 - 1)
    ),
    "GetFailureCase": st.builds(pb.GetFailureCaseRequest, id=st.integers(-(2**63), 2**63 - 1)),
    "ExportFailureCases": st.just(pb.ExportFailureCasesRequest()),
    "GetFailureStats": st.just(pb.GetFailureStatsRequest()),
    "PurgeFailureCases": st.just(pb.PurgeFailureCasesRequest()),
}
assert set(REQUESTS) == set(METHODS), "a new RPC needs a strategy here"


@st.composite
def raw_payloads(draw: st.DrawFn) -> tuple[str, bytes]:
    """(method, bytes): garbage, or a real message truncated, bit-flipped or extended."""
    method = draw(st.sampled_from(METHODS))
    kind = draw(st.sampled_from(["garbage", "truncated", "flipped", "extended"]))
    if kind == "garbage":
        return method, draw(st.binary(max_size=256))
    data = draw(REQUESTS[method]).SerializeToString()
    if kind == "truncated":
        return method, data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    if kind == "flipped" and data:
        at = draw(st.integers(0, len(data) - 1))
        flipped = data[at] ^ (1 << draw(st.integers(0, 7)))
        return method, data[:at] + bytes([flipped]) + data[at + 1 :]
    # extended: an unknown field, or raw bytes appended
    return method, data + draw(st.sampled_from([b"\xa2\x06\x04evil", b""]) | st.binary(max_size=16))


@pytest.fixture(scope="module")
def daemon(
    tiny_paths: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalDaemon]:
    d = local_daemon(
        tmp_path_factory.mktemp("fuzz"),
        {
            "models": {"target": str(tiny_paths[0]), "draft": str(tiny_paths[1])},
            "generation": {"max_tokens": 4, "max_tokens_cap": CAP, "max_prompt_tokens": 256},
            "server": {"max_message_bytes": 64 * 1024},
            # Recording stays on (the recorder is fuzzed too); Train never gets enough cases.
            "learning": {"min_cases": 1_000_000},
        },
    )
    yield d
    d.close()


def drive(call: grpc.Call, endless: bool) -> grpc.StatusCode:
    """Consume a stream to its end; an endless one (a Stats watch) after its first reply."""
    try:
        for _reply in call:
            if endless:
                call.cancel()
                return grpc.StatusCode.OK
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


class Fuzzer:
    """Sends requests, checks each answer and the daemon's health, keeps the figures."""

    def __init__(self, daemon: LocalDaemon) -> None:
        self.daemon = daemon
        self.codes: Counter[str] = Counter()
        self.bad: list[str] = []

    def send(self, method: str, request: object, raw: bool) -> None:
        # As bytes over a streaming call, which reads a unary reply as a stream of one.
        payload = request if raw else request.SerializeToString()  # type: ignore[attr-defined]
        code = drive(self.daemon.raw_stream(method)(payload, timeout=30), endless=method == "Stats")
        self.codes[code.name] += 1
        if code not in DOCUMENTED:
            self.bad.append(f"{method} {'bytes' if raw else 'message'} -> {code.name}: {request!r}")
        assert self.daemon.health() == SERVING

    def check(self, before: Usage, examples: int) -> Usage:
        assert not self.bad, "\n".join(self.bad[:10])
        wait_idle(self.daemon)
        after = usage(self.daemon)
        growth = after.growth_since(before)
        assert after.kv_caches == 0, growth
        assert after.threads <= before.threads + 2, growth
        assert after.mlx_active_bytes <= before.mlx_active_bytes + (1 << 20), growth
        assert after.rss_bytes <= before.rss_bytes + (64 << 20), growth
        print(f"\n{examples} fuzz examples, answered {dict(self.codes)}; {growth}")
        return after


def warm_up(daemon: LocalDaemon) -> Usage:
    """Every path once, so pools and caches that fill once are there before the baseline."""
    for mode in (pb.MODE_DETAILED, pb.MODE_FAST):
        request = pb.GenerateRequest(prompt="warm", max_tokens=CAP, mode=mode, temperature=0.5)
        list(daemon.stub.Generate(request, timeout=60))
    next(iter(daemon.stub.Stats(pb.StatsRequest(), timeout=10)))
    wait_idle(daemon)
    return usage(daemon)


@pytest.mark.slow
def test_fuzzed_request_messages(daemon: LocalDaemon) -> None:
    before = warm_up(daemon)
    fuzzer = Fuzzer(daemon)

    @settings(FUZZ_SETTINGS, max_examples=MESSAGE_EXAMPLES)
    @given(st.sampled_from(METHODS).flatmap(lambda m: st.tuples(st.just(m), REQUESTS[m])))
    def one(case: tuple[str, object]) -> None:
        fuzzer.send(*case, raw=False)

    one()
    fuzzer.check(before, sum(fuzzer.codes.values()))


@pytest.mark.slow
def test_fuzzed_raw_bytes(daemon: LocalDaemon) -> None:
    before = warm_up(daemon)
    fuzzer = Fuzzer(daemon)

    @settings(FUZZ_SETTINGS, max_examples=BYTES_EXAMPLES)
    @given(raw_payloads())
    def one(case: tuple[str, bytes]) -> None:
        fuzzer.send(*case, raw=True)

    one()
    fuzzer.check(before, sum(fuzzer.codes.values()))
