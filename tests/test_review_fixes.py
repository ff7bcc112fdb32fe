"""The correctness items of issue 19's review, each through the real parts it is about.

Each test failed before its fix: a training run overwrote an adapter activated while it
trained; TTFT and total time left out the time a request queued; the config accepted
`generation.top_p: 0`, which every request then refused; fast mode prefilled a whole prompt in
one engine step; ActivateAdapter waited for the worker without a deadline and ran after its
caller had gone; the worker emptied MLX's buffer cache after every request; a damaged failure
database stopped the daemon from starting (and was INTERNAL when it broke later); the health
shutdown reached into grpc_health's private members.
"""

from __future__ import annotations

import ast
import inspect
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import mlx.core as mx
import pytest
from helpers.adapters import make_adapter
from helpers.daemons import LocalDaemon, local_daemon, wait_until
from speclora.client.stub import SpecLoRAClient, TrainProgress, TrainResult
from speclora.daemon import server as server_module
from speclora.daemon.engine import (
    GenerationRequest,
    GenerationSummary,
    PrefillProgress,
    StepEvent,
    generate,
)
from speclora.daemon.errors import InvalidRequestError
from speclora.daemon.learning.adapters import PROMOTED
from speclora.daemon.learning.store import FailureCase
from speclora.daemon.runtime import build_hub
from speclora.daemon.servicer import generation_request_from_pb
from speclora.daemon.worker import Worker
from speclora.shared.config import Config, ConfigError, SpeculationConfig, load_config
from speclora.shared.pb import speclora_pb2 as pb


def _hold_worker(daemon: LocalDaemon) -> tuple[threading.Event, threading.Thread]:
    """Keep the engine worker busy inside a call until the returned event is set."""
    entered, release = threading.Event(), threading.Event()
    holder = threading.Thread(
        target=daemon.worker.call, args=("hold", lambda hub: (entered.set(), release.wait(30)))
    )
    holder.start()
    assert entered.wait(10)
    return release, holder


@pytest.fixture
def learning_daemon(isolated_home: Path, tiny_target_path: Path) -> Iterator[LocalDaemon]:
    d = local_daemon(
        isolated_home,
        {
            "models": {"target": str(tiny_target_path), "draft": "self:2"},
            "learning": {"min_cases": 4, "auto_train": False},  # trains by hand
            "lora": {"batch_size": 2, "rank": 4},
        },
    )
    yield d
    d.close()


def _seed_cases(daemon: LocalDaemon, n: int = 12) -> None:
    daemon.runtime.learning.store.add_many(  # type: ignore[union-attr]
        [
            FailureCase(
                tuple(range(5 + i, 25 + i)),
                tuple(range(100 + i, 130 + i)),
                rejection_positions=(0, 3, 9),
                proposed=20,
                accepted=2,
            )
            for i in range(n)
        ]
    )


# ---------------------------------------------------------------------- training vs activation


def test_training_does_not_overwrite_an_activation_made_while_it_trained(
    learning_daemon: LocalDaemon,
) -> None:
    daemon = learning_daemon
    learning = daemon.runtime.learning  # type: ignore[union-attr]
    _seed_cases(daemon)
    chosen = daemon.worker.call("make", lambda hub: make_adapter(learning.adapters, hub, 7), 30)
    client = SpecLoRAClient(daemon.address)
    events: list[object] = []
    progressed = threading.Event()

    def train() -> None:
        for event in client.train(steps=150, force_promote=True):
            events.append(event)
            if isinstance(event, TrainProgress):
                progressed.set()

    trainer = threading.Thread(target=train)
    trainer.start()
    assert progressed.wait(60), events
    client.activate_adapter(chosen)  # by hand, while the run trains
    trainer.join(120)
    result = events[-1]
    assert isinstance(result, TrainResult), events[-3:]
    assert not result.promoted
    assert "activated while this run trained" in result.reason
    assert daemon.worker.hub.adapter_version == chosen == learning.adapters.active_version()
    # The run's adapter passed the gate (forced), so it can be taken later without --force.
    assert learning.adapters.get(result.adapter_version).status == PROMOTED
    assert client.activate_adapter(result.adapter_version).version == result.adapter_version
    client.close()


# ---------------------------------------------------------------------- times from arrival


def test_ttft_and_total_time_count_the_time_queued(
    isolated_home: Path, tiny_target_path: Path
) -> None:
    daemon = local_daemon(
        isolated_home,
        {"models": {"target": str(tiny_target_path), "draft": "self:2"}},
        learning=False,
    )
    try:
        release, holder = _hold_worker(daemon)
        out: list[pb.GenerateEvent] = []
        call = threading.Thread(
            target=lambda: out.extend(
                daemon.stub.Generate(pb.GenerateRequest(prompt="hi", max_tokens=3), timeout=60)
            )
        )
        call.start()
        wait_until(lambda: daemon.worker.queue_depth == 1)
        time.sleep(1.0)  # the request waits in the queue this long
        release.set()
        call.join(30)
        holder.join(10)
        summary = out[-1].summary
        assert summary.time_to_first_token_s >= 0.9, summary
        assert summary.total_time_s >= summary.time_to_first_token_s
    finally:
        daemon.close()


# ---------------------------------------------------------------------- one range for top_p


@pytest.mark.parametrize(
    ("key", "values"),
    [
        ("top_p", [-0.5, 0.0, 1e-6, 0.5, 1.0, 1.01]),
        ("temperature", [-0.1, 0.0, 1.0, 2.0, 2.01]),
    ],
)
def test_config_and_request_accept_the_same_values(key: str, values: list[float]) -> None:
    """A value the config accepts as the default must be one a request may send, and back."""
    for value in values:
        try:
            load_config(env={}, overrides={"generation": {key: value}})
            config_ok = True
        except ConfigError as exc:
            assert f"generation.{key}" in str(exc)
            config_ok = False
        try:
            generation_request_from_pb(
                pb.GenerateRequest(prompt="x", **{key: value}), Config(), "r"
            )
            request_ok = True
        except InvalidRequestError as exc:
            assert exc.field == key
            request_ok = False
        assert config_ok == request_ok, (key, value, config_ok, request_ok)


# ---------------------------------------------------------------------- fast mode


def test_fast_mode_prefills_in_chunks_between_other_streams(tiny_loaded) -> None:  # type: ignore[no-untyped-def]
    """Each prefill chunk is its own event, so the worker runs other streams' steps between
    them; and the output is still the target's greedy output."""
    target, draft, tokenizer = tiny_loaded
    spec = SpeculationConfig(prefill_chunk=64)
    prompt = " ".join(str(i % 10) for i in range(700))
    events = list(
        generate(
            target,
            draft,
            tokenizer,
            GenerationRequest(prompt=prompt, raw=True, max_tokens=8, mode="fast", draft_tokens=2),
            spec,
        )
    )
    first_step = next(i for i, e in enumerate(events) if isinstance(e, StepEvent))
    prefill = events[:first_step]
    summary = events[-1]
    assert isinstance(summary, GenerationSummary)
    assert all(isinstance(e, PrefillProgress) for e in prefill)
    assert len(prefill) == math.ceil((summary.prompt_tokens - 1) / 64) >= 8
    detailed = list(
        generate(
            target,
            None,
            tokenizer,
            GenerationRequest(prompt=prompt, raw=True, max_tokens=8, draft_tokens=0),
            spec,
        )
    )[-1]
    assert summary.completion_token_ids == detailed.completion_token_ids


@pytest.mark.parametrize("stop", [(), ("e",), (" t",)])
def test_fast_mode_chunks_add_up_when_it_ends_on_length(tiny_loaded, stop) -> None:  # type: ignore[no-untyped-def]
    target, draft, tokenizer = tiny_loaded
    for max_tokens in (1, 2, 3, 5, 9, 17):
        request = GenerationRequest(
            prompt="Write a haiku about the sea.", max_tokens=max_tokens, mode="fast", stop=stop
        )
        events = list(generate(target, draft, tokenizer, request, SpeculationConfig()))
        summary = events[-1]
        chunks = [e.chunk for e in events if isinstance(e, StepEvent) and e.chunk]
        assert [t for c in chunks for t in c.token_ids] == list(summary.completion_token_ids)
        if summary.finish_reason == "length":
            text = tokenizer.decode(list(summary.completion_token_ids))
            assert "".join(c.text for c in chunks) == text, (max_tokens, stop)


# ---------------------------------------------------------------------- ActivateAdapter


@pytest.mark.parametrize("how", ["deadline", "cancel"])
def test_activate_adapter_gives_up_with_its_caller(learning_daemon: LocalDaemon, how: str) -> None:
    """A swap the worker has not reached when the caller's deadline passes (or the caller
    cancels) never runs, and the RPC thread does not wait on it."""
    daemon = learning_daemon
    learning = daemon.runtime.learning  # type: ignore[union-attr]
    version = daemon.worker.call("make", lambda hub: make_adapter(learning.adapters, hub, 3), 30)
    release, holder = _hold_worker(daemon)
    try:
        request = pb.ActivateAdapterRequest(version=version)
        if how == "deadline":
            with pytest.raises(grpc.RpcError) as err:
                daemon.stub.ActivateAdapter(request, timeout=0.5)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            future = daemon.stub.ActivateAdapter.future(request)
            time.sleep(0.3)
            future.cancel()
            # The daemon hears of the cancel asynchronously; a swap the worker has started by
            # then cannot be undone, so give the news time to arrive before freeing it.
            time.sleep(0.5)
    finally:
        release.set()
        holder.join(10)
    time.sleep(0.5)  # the worker is free: a swap still queued would run now
    assert daemon.worker.call("serving", lambda hub: hub.adapter_version, 10) == ""
    assert learning.adapters.active_version() == ""


# ---------------------------------------------------------------------- MLX's buffer cache


def test_buffer_cache_is_kept_between_requests_and_released_when_idle(
    tiny_target_path: Path,
) -> None:
    config = load_config(
        env={}, overrides={"models": {"target": str(tiny_target_path), "draft": "self:2"}}
    )
    worker = Worker(build_hub(config), config, idle_release_s=1.0).start()
    try:
        for _ in range(2):
            list(worker.submit_generation(GenerationRequest(prompt="hello", max_tokens=8)))
        wait_until(lambda: worker.active_count == 0)
        kept = worker.call("cache", lambda hub: mx.get_cache_memory(), 10)
        assert kept > 0, "the buffer cache was emptied right after the requests"
        time.sleep(1.5)
        assert worker.call("cache", lambda hub: mx.get_cache_memory(), 10) == 0
    finally:
        worker.stop()


# ---------------------------------------------------------------------- a damaged database


def test_damaged_failure_database_is_explained_and_serving_goes_on(
    isolated_home: Path, tiny_target_path: Path
) -> None:
    database = isolated_home / "data" / "failures.sqlite3"
    database.parent.mkdir(parents=True)
    database.write_bytes(b"this is not a database" * 200)
    daemon = local_daemon(
        isolated_home, {"models": {"target": str(tiny_target_path), "draft": "self:2"}}
    )
    try:
        events = list(
            daemon.stub.Generate(pb.GenerateRequest(prompt="hi", max_tokens=3), timeout=30)
        )
        assert events[-1].HasField("summary")  # generation serves
        for call in (
            lambda: daemon.stub.ListFailureCases(pb.ListFailureCasesRequest(), timeout=10),
            lambda: daemon.stub.GetFailureStats(pb.GetFailureStatsRequest(), timeout=10),
            lambda: list(daemon.stub.Train(pb.TrainRequest(), timeout=10)),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert str(database) in err.value.details()
            assert "speclora failures purge --yes" in err.value.details()
        snap = daemon.stub.GetStats(pb.GetStatsRequest(), timeout=10)
        assert str(database) in snap.failure_store_error and snap.failure_cases == 0
        # The fix the message names works, without a restart.
        daemon.stub.PurgeFailureCases(pb.PurgeFailureCasesRequest(), timeout=10)
        assert daemon.stub.ListFailureCases(pb.ListFailureCasesRequest(), timeout=10).total == 0
        assert daemon.stub.GetStats(pb.GetStatsRequest(), timeout=10).failure_store_error == ""
    finally:
        daemon.close()


def test_database_damaged_while_serving_is_not_internal(
    isolated_home: Path, tiny_target_path: Path
) -> None:
    daemon = local_daemon(
        isolated_home, {"models": {"target": str(tiny_target_path), "draft": "self:2"}}
    )
    try:
        store = daemon.runtime.learning.store  # type: ignore[union-attr]
        _seed_cases(daemon, 3)
        store.close()  # the daemon reopens it at the next call, and finds it damaged
        store.path.write_bytes(b"\x00garbage" * 4096)
        for suffix in ("-wal", "-shm"):
            Path(f"{store.path}{suffix}").unlink(missing_ok=True)
        with pytest.raises(grpc.RpcError) as err:
            daemon.stub.ListFailureCases(pb.ListFailureCasesRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
        assert str(store.path) in err.value.details()
        events = list(
            daemon.stub.Generate(pb.GenerateRequest(prompt="hi", max_tokens=3), timeout=30)
        )
        assert events[-1].HasField("summary")
    finally:
        daemon.close()


# ---------------------------------------------------------------------- health at shutdown


def test_health_servicer_uses_only_grpc_healths_public_api() -> None:
    """Every `self._x` our HealthServicer touches is one it sets itself: grpc_health's private
    members (its lock, its callback registry) may change in any release."""
    tree = ast.parse(inspect.getsource(server_module.HealthServicer))
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
        and node.attr.startswith("_")
    }
    own = {
        target.attr
        for node in ast.walk(tree)
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Attribute)
    }
    own |= {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert used <= own, f"private grpc_health members used: {sorted(used - own)}"
