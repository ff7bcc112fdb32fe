"""A real gRPC server in-process on a temporary Unix socket, with tiny models.

One daemon serves the whole module (loading models is the slow part); each test talks to it
through plain grpc stubs so status codes and messages are asserted exactly as clients see them.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers.daemons import LocalDaemon, local_daemon, wait_until
from speclora.daemon.blas import blas_info
from speclora.daemon.errors import InvalidRequestError
from speclora.daemon.server import (
    SERVICE_NAME,
    AlreadyRunningError,
    InstanceLock,
    ServerSetupError,
    check_tcp_address,
    create_server,
)
from speclora.daemon.state import ModelHub
from speclora.shared.paths import resolve_paths
from speclora.shared.pb import speclora_pb2 as pb
from speclora.shared.pb import speclora_pb2_grpc as pb_grpc

MAX_ACTIVE = 3
QUEUE_SIZE = 3
MAX_PROMPT_TOKENS = 400
PROMPT = "Explain quantum computing simply."
LONG = 2000  # tokens: with the prompt, just inside the tiny model's 2048 context


@pytest.fixture(scope="module")
def daemon(
    tiny_paths: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalDaemon]:
    d = local_daemon(
        tmp_path_factory.mktemp("srv"),
        {
            "models": {"target": str(tiny_paths[0]), "draft": str(tiny_paths[1])},
            "server": {"max_active": MAX_ACTIVE, "queue_size": QUEUE_SIZE},
            "generation": {"max_prompt_tokens": MAX_PROMPT_TOKENS, "max_tokens_cap": 4000},
        },
        learning=False,
    )
    yield d
    d.close()


def _generate(daemon: LocalDaemon, **fields: object) -> list[pb.GenerateEvent]:
    fields.setdefault("prompt", PROMPT)
    return list(daemon.stub.Generate(pb.GenerateRequest(**fields), timeout=60))


def _text(events: list[pb.GenerateEvent]) -> str:
    return "".join(e.chunk.text for e in events if e.HasField("chunk"))


def _ids(events: list[pb.GenerateEvent]) -> list[int]:
    return [t for e in events if e.HasField("chunk") for t in e.chunk.token_ids]


# ---------------------------------------------------------------------- generation


@pytest.mark.parametrize("mode", [pb.MODE_DETAILED, pb.MODE_FAST])
def test_generate_streams_chunks_then_a_full_summary(daemon: LocalDaemon, mode: int) -> None:
    events = _generate(daemon, max_tokens=24, temperature=0.0, mode=mode)
    assert all(e.HasField("chunk") for e in events[:-1]) and len(events) >= 2
    summary = events[-1].summary
    assert events[-1].HasField("summary")
    assert len(summary.request_id) >= 8
    assert summary.prompt_tokens > 0
    assert summary.completion_tokens == len(_ids(events))
    assert summary.finish_reason in (pb.FINISH_REASON_EOS, pb.FINISH_REASON_LENGTH)
    assert summary.mode == mode
    assert 0 < summary.target_passes <= summary.completion_tokens
    assert summary.tokens_per_step == pytest.approx(
        summary.completion_tokens / summary.target_passes, rel=1e-5
    )
    if summary.proposed:
        assert summary.acceptance_rate == pytest.approx(summary.accepted / summary.proposed)
    assert (
        summary.time_to_first_token_s > 0 and summary.total_time_s >= summary.time_to_first_token_s
    )
    for event in events[:-1]:
        assert len(event.chunk.from_draft) == len(event.chunk.token_ids)
    assert summary.adapter_version == "" and not summary.failure_recorded


def test_greedy_output_equals_target_alone(daemon: LocalDaemon) -> None:
    """T = 0 through the daemon is token for token mlx-lm's target-only greedy decoding."""
    n = 32
    events = _generate(daemon, prompt="The quick brown fox", max_tokens=n, temperature=0.0)

    def reference(hub: ModelHub) -> list[int]:
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from speclora.daemon.engine import GenerationRequest, build_prompt_tokens

        prompt = build_prompt_tokens(hub.tokenizer, GenerationRequest(prompt="The quick brown fox"))
        out: list[int] = []
        for token, _ in generate_step(mx.array(prompt), hub.target, max_tokens=n):
            out.append(int(token))
            if int(token) in hub.tokenizer.eos_token_ids:
                break
        return out

    # MLX is driven from the worker thread only, so the reference runs there too.
    assert _ids(events) == daemon.worker.call("reference", reference, timeout=60)


def test_stop_strings_and_chat_messages(daemon: LocalDaemon) -> None:
    events = _generate(
        daemon,
        prompt="",
        messages=[
            pb.ChatMessage(role="system", content="Be brief."),
            pb.ChatMessage(role="user", content="Hi"),
        ],
        max_tokens=8,
    )
    assert events[-1].summary.completion_tokens > 0
    full = _text(_generate(daemon, max_tokens=40))
    if len(full) > 4:
        stop = full[2:4]
        cut = _generate(daemon, max_tokens=40, stop=[stop])
        assert cut[-1].summary.finish_reason == pb.FINISH_REASON_STOP_STRING
        assert stop not in _text(cut)


def test_a_chats_next_turn_reuses_the_prompt_cache(daemon: LocalDaemon) -> None:
    """Over the wire: the next turn's summary says how much of its prompt came from the prompt
    cache, Stats counts it, and the output is the same as with nothing cached."""
    before = next(iter(daemon.stub.Stats(pb.StatsRequest(), timeout=10)))
    turn1 = [pb.ChatMessage(role="user", content="Name a colour of the sea, then a fish.")]
    first = _generate(daemon, prompt="", messages=turn1, max_tokens=12)
    turn2 = turn1 + [
        pb.ChatMessage(role="assistant", content=_text(first)),
        pb.ChatMessage(role="user", content="And a bird?"),
    ]
    second = _generate(daemon, prompt="", messages=turn2, max_tokens=12)[-1].summary
    assert first[-1].summary.prompt_tokens <= second.cached_prompt_tokens < second.prompt_tokens
    # With the prompt cache emptied the request prefills everything; repeated, it reuses it;
    # the output is the same both ways.
    daemon.worker.call("forget_prompts", lambda hub: hub.prompt_cache.clear(), 30)
    fresh = _generate(daemon, prompt="", messages=turn2, max_tokens=12)
    cached = _generate(daemon, prompt="", messages=turn2, max_tokens=12)
    assert fresh[-1].summary.cached_prompt_tokens == 0 < cached[-1].summary.cached_prompt_tokens
    assert _text(fresh) == _text(cached)
    snap = next(iter(daemon.stub.Stats(pb.StatsRequest(), timeout=10)))
    assert snap.prompt_tokens_cached - before.prompt_tokens_cached >= second.cached_prompt_tokens
    assert snap.prompt_tokens_total > snap.prompt_tokens_cached
    assert snap.prompt_cache_bytes > 0


# ---------------------------------------------------------------------- stats, health, reflection


def test_stats_reports_models_counters_and_memory(daemon: LocalDaemon) -> None:
    _generate(daemon, max_tokens=8)
    snap = next(iter(daemon.stub.Stats(pb.StatsRequest(), timeout=10)))
    assert snap.target_model == "tiny-target" and snap.draft_model == "tiny-draft"
    assert snap.requests_total >= 1 and snap.tokens_total >= 8
    assert snap.requests_active == 0 and snap.queue_depth == 0
    assert snap.per_adapter and snap.per_adapter[0].adapter_version == ""
    assert len(snap.acceptance_history) >= 1
    assert 0 < snap.rss_bytes <= snap.peak_rss_bytes
    assert snap.weight_bytes > 0 and snap.uptime_s > 0
    assert snap.blas in (pb.BLAS_MKL, pb.BLAS_OPENBLAS, pb.BLAS_ACCELERATE, pb.BLAS_REFERENCE)
    assert snap.blas_name in ("mkl", "openblas", "accelerate", "reference")
    assert snap.blas_skinny_rows == blas_info().skinny_rows  # the kernel, where it is built
    assert snap.version and snap.default_mode == pb.MODE_DETAILED
    assert snap.training_state == pb.TRAINING_STATE_IDLE
    assert snap.training_state_name == "idle"  # the deprecated string keeps its field
    assert snap.pid == os.getpid()
    assert daemon.stub.GetStats(pb.GetStatsRequest(), timeout=10).requests_total >= 1


def test_stats_watch_streams_until_cancelled(daemon: LocalDaemon) -> None:
    call = daemon.stub.Stats(pb.StatsRequest(watch=True, interval_s=0.1))
    started = time.monotonic()
    snaps = [next(call) for _ in range(3)]
    call.cancel()
    assert time.monotonic() - started < 5
    assert snaps[2].uptime_s > snaps[0].uptime_s


def test_health_is_serving(daemon: LocalDaemon) -> None:
    health = health_pb2_grpc.HealthStub(daemon.channel)
    for service in ("", SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(daemon: LocalDaemon) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(daemon.channel)
    replies = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert SERVICE_NAME in names and "grpc.health.v1.Health" in names


# ---------------------------------------------------------------------- concurrency


def test_two_streams_interleave(daemon: LocalDaemon) -> None:
    """The second stream's first token arrives while the first is still running."""
    first = daemon.stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=LONG), timeout=60)
    assert next(first).HasField("chunk")
    second = daemon.stub.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=3), timeout=60)
    events = list(second)
    assert events[-1].HasField("summary")
    # The first is still going: it has not reached its summary yet.
    following = next(first)
    assert following.HasField("chunk")
    first.cancel()


def test_cancelling_frees_the_worker(daemon: LocalDaemon) -> None:
    longs = [
        daemon.stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=LONG), timeout=60)
        for _ in range(MAX_ACTIVE)
    ]
    for call in longs:
        next(call)
    for call in longs:
        call.cancel()
    wait_until(lambda: daemon.worker.active_count == 0, timeout=5)
    started = time.monotonic()
    events = _generate(daemon, max_tokens=4)
    assert events[-1].HasField("summary")
    assert time.monotonic() - started < 5


def test_full_queue_answers_resource_exhausted_at_once(daemon: LocalDaemon) -> None:
    # Hold the worker inside a call so queued requests stay queued, deterministically.
    entered, release = threading.Event(), threading.Event()
    blocker = threading.Thread(
        target=daemon.worker.call,
        args=("hold", lambda hub: (entered.set(), release.wait(30))),
    )
    blocker.start()
    assert entered.wait(10)
    calls = [
        daemon.stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=4), timeout=60)
        for _ in range(QUEUE_SIZE)
    ]
    try:
        wait_until(lambda: daemon.worker.queue_depth == QUEUE_SIZE)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            _generate(daemon, max_tokens=2)
        assert time.monotonic() - started < 2
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"({QUEUE_SIZE} requests waiting" in err.value.details()
    finally:
        release.set()
        blocker.join(10)
    for call in calls:  # the queued ones are then served normally
        assert list(call)[-1].HasField("summary")
    wait_until(lambda: daemon.worker.active_count == 0 and daemon.worker.queue_depth == 0)


# ---------------------------------------------------------------------- validation

LONG_PROMPT = "1 2 3 4 5 6 7 8 9 10 " * 200

BAD_GENERATE = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 4001}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": float("nan")}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"seed": -5}, "seed"),
    ({"draft_tokens": 17}, "draft_tokens"),
    ({"draft_tokens": -1}, "draft_tokens"),
    ({"mode": 7}, "mode"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "", "raw": True}, "prompt"),
    ({"stop": [""]}, "stop[0]"),
    ({"stop": ["x" * 300]}, "stop[0]"),
    ({"stop": ["s"] * 17}, "stop"),
    ({"prompt": LONG_PROMPT}, "prompt"),
    ({"prompt": "hi", "max_tokens": 2040}, "max_tokens"),  # prompt + max_tokens > context 2048
    ({"prompt": "", "messages": [pb.ChatMessage(role="wizard", content="x")]}, "messages[0].role"),
    ({"prompt": "x", "messages": [pb.ChatMessage(role="user", content="y")]}, "prompt"),
    ({"prompt": "", "raw": True, "messages": [pb.ChatMessage(role="user", content="y")]}, "raw"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_GENERATE)
def test_bad_generate_requests_name_the_field(
    daemon: LocalDaemon, fields: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _generate(daemon, **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith(f"{field}:"), err.value.details()


@pytest.mark.parametrize("interval", [0.0, -1.0, 0.05, 4000.0, float("nan")])
def test_bad_stats_interval(daemon: LocalDaemon, interval: float) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(daemon.stub.Stats(pb.StatsRequest(watch=True, interval_s=interval), timeout=5))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "interval_s" in err.value.details()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": 100_001}, "steps"),
        ({"max_cases": 1}, "max_cases"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"learning_rate": 2.0}, "learning_rate"),
    ],
)
def test_bad_train_requests(daemon: LocalDaemon, fields: dict[str, object], field: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(daemon.stub.Train(pb.TrainRequest(**fields), timeout=5))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}:")


@pytest.mark.parametrize("version", ["", "../etc", "/abs/path", "a" * 100])
def test_bad_adapter_versions(daemon: LocalDaemon, version: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        daemon.stub.ActivateAdapter(pb.ActivateAdapterRequest(version=version), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("version:")


def test_train_without_learning_loop_is_a_precondition(daemon: LocalDaemon) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(daemon.stub.Train(pb.TrainRequest(), timeout=5))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_serving_continues_after_bad_input(daemon: LocalDaemon) -> None:
    health = health_pb2_grpc.HealthStub(daemon.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert _generate(daemon, max_tokens=2)[-1].HasField("summary")


def test_oversized_message_is_refused(daemon: LocalDaemon) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _generate(daemon, prompt="x" * (daemon.config.server.max_message_bytes + 10))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_bug_is_internal_with_a_request_id(
    daemon: LocalDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> list[int]:
        raise ZeroDivisionError("oops")

    monkeypatch.setattr("speclora.daemon.requests.build_prompt_tokens", broken)
    with pytest.raises(grpc.RpcError) as err:
        _generate(daemon)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "ZeroDivisionError" in err.value.details() and "request" in err.value.details()


# ---------------------------------------------------------------------- transport and access


def test_socket_and_directory_are_private(daemon: LocalDaemon) -> None:
    socket_path = Path(daemon.address.removeprefix("unix:"))
    assert stat.S_ISSOCK(socket_path.stat().st_mode)
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o700


def test_tcp_needs_the_token(daemon: LocalDaemon, tmp_path: Path) -> None:
    env = {"SPECLORA_HOME": str(tmp_path)}
    config = dataclasses.replace(
        daemon.config,
        server=dataclasses.replace(daemon.config.server, tcp_address="127.0.0.1:0"),
    )
    paths = resolve_paths(env)
    server, address = create_server(config, daemon.worker, paths=paths)
    server.start()
    try:
        token_file = paths.token_file
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        channel = grpc.insecure_channel(server.tcp_address)
        stub = pb_grpc.SpecLoRAStub(channel)
        request = pb.GenerateRequest(prompt="hi", max_tokens=2)
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(request, metadata=metadata, timeout=10))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        events = list(stub.Generate(request, metadata=(("authorization", f"Bearer {token}"),)))
        assert events[-1].HasField("summary")
        # Health stays open for supervisors; the Unix socket needs no token.
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
        unix = pb_grpc.SpecLoRAStub(grpc.insecure_channel(address))
        assert list(unix.Generate(request, timeout=10))[-1].HasField("summary")
        channel.close()
    finally:
        server.grpc_server.stop(0).wait()


def test_non_loopback_tcp_is_refused_without_the_flag() -> None:
    with pytest.raises(ServerSetupError, match="allow_non_loopback"):
        check_tcp_address("0.0.0.0:5000", allow_non_loopback=False)
    with pytest.raises(ServerSetupError):
        check_tcp_address("192.168.1.10:5000", allow_non_loopback=False)
    assert check_tcp_address("0.0.0.0:5000", allow_non_loopback=True) == "0.0.0.0:5000"
    for ok in ("127.0.0.1:1", "localhost:1", "[::1]:1"):
        check_tcp_address(ok, allow_non_loopback=False)


def test_overlong_socket_path_is_a_clear_error(daemon: LocalDaemon, tmp_path: Path) -> None:
    config = dataclasses.replace(
        daemon.config,
        server=dataclasses.replace(daemon.config.server, socket_path=str(tmp_path / ("s" * 120))),
    )
    with pytest.raises(ServerSetupError, match="bytes; Unix sockets allow"):
        create_server(config, daemon.worker, paths=daemon.paths)


def test_second_instance_lock_names_the_pid(tmp_path: Path) -> None:
    first = InstanceLock(tmp_path / "run" / "speclora.lock").acquire()
    try:
        with pytest.raises(AlreadyRunningError, match=f"already running \\(pid {os.getpid()}\\)"):
            InstanceLock(tmp_path / "run" / "speclora.lock").acquire(retry_s=0.1)
    finally:
        first.release()
    InstanceLock(tmp_path / "run" / "speclora.lock").acquire().release()


def test_invalid_request_error_names_field() -> None:
    assert str(InvalidRequestError("top_p", "bad")) == "top_p: bad"


_METHODS = tuple(m.name for m in pb.DESCRIPTOR.services_by_name["SpecLoRA"].methods)


@pytest.mark.parametrize(
    ("method", "payload"),
    [(m, b"\xff\xff\xff") for m in _METHODS]  # garbage
    + [(m, b"\x0a\x05ab") for m in _METHODS]  # truncated
    # Invalid UTF-8 in a string field (field 1 is a string in these three).
    + [(m, b"\x0a\x02\xff\xfe") for m in ("Generate", "ActivateAdapter", "GetAdapter")],
)
def test_unparsable_bytes_are_invalid_argument(
    daemon: LocalDaemon, method: str, payload: bytes
) -> None:
    # A unary_stream call reads a unary reply too (one message, then the status).
    call = daemon.channel.unary_stream(f"/speclora.v1.SpecLoRA/{method}")
    with pytest.raises(grpc.RpcError) as err:
        list(call(payload, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("request: not a valid speclora.v1.")
