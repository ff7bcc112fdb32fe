"""The learning loop through the daemon: recording, Train streaming, training interleaved with
generation, adapter activation and rollback over the RPC. Toy domain target, self:1 draft."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.daemons import local_config
from helpers.httpcheck import one, scrape
from speclora.client.stub import (
    GenerationSummary,
    PreconditionFailed,
    SpecLoRAClient,
    TrainEvaluation,
    TrainProgress,
    TrainResult,
    TrainStarted,
)
from speclora.daemon.learning import toy
from speclora.daemon.runtime import Runtime, build_runtime
from speclora.daemon.server import DaemonServer, create_server

pytestmark = pytest.mark.slow
STEPS = 12


@pytest.fixture(scope="module")
def domain_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Same path as tests/test_learning.py uses, so one session trains the toy target once.
    return toy.write_domain_target(tmp_path_factory.getbasetemp() / "toy-domain-target")


@pytest.fixture(scope="module")
def served(
    domain_target: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Runtime, DaemonServer, SpecLoRAClient]]:
    home = tmp_path_factory.mktemp("learn")
    config, paths = local_config(
        home,
        {
            "models": {"target": str(domain_target), "draft": "self:1"},
            # The tests train by hand and count runs and pending cases.
            "learning": {"min_cases": 4, "failure_threshold": 0.9, "auto_train": False},
            "lora": {"steps": STEPS, "learning_rate": 1e-3, "batch_size": 2},
        },
    )
    runtime = build_runtime(config, paths)
    server, address = create_server(config, runtime.worker, learning=runtime.learning, paths=paths)
    server.start()
    client = SpecLoRAClient(address)
    yield runtime, server, client
    client.close()
    server.shutdown(1.0)
    runtime.close()


RUNS = "speclora:training_runs_total"


def _summary(events: list[object]) -> GenerationSummary:
    assert isinstance(events[-1], GenerationSummary)
    return events[-1]


def _record_cases(client: SpecLoRAClient, n: int) -> None:
    """Generate on domain prompts until at least n // 2 cases are stored. How many requests
    that takes depends on the draft: once the daemon has seen it fail, a request opens with a
    one-token probe, and a probe the draft gets right is no failure. The history drafter is
    off for these requests: on the toy grammar it carries most tokens (its past outputs repeat),
    so the draft would be tested too seldom to record cases quickly."""
    for prompt in toy.domain_prompts(4 * n):
        events = client.generate(prompt, max_tokens=24, temperature=0.0, use_history=False)
        summary = _summary(list(events))
        if client.stats().failure_cases >= n // 2:
            return
        assert summary.completion_tokens > 0
    raise AssertionError(f"fewer than {n // 2} failure cases after {4 * n} domain requests")


def test_failures_are_recorded_and_counted(served: tuple) -> None:
    _, _, client = served
    recorded = [
        _summary(list(client.generate(p, max_tokens=24))).failure_recorded
        for p in toy.domain_prompts(6, seed=1)
    ]
    assert any(recorded)
    no_record = _summary(list(client.generate("Write about the sea.", max_tokens=24, record=False)))
    assert not no_record.failure_recorded
    _record_cases(client, 8)
    snap = client.stats()
    assert snap.failure_cases >= 4 and snap.pending_cases >= 4


def test_train_streams_progress_and_swaps_the_adapter_in(served: tuple) -> None:
    runtime, server, client = served
    _record_cases(client, 8)
    promoted_before = one(scrape(server.http_address), RUNS, outcome="promoted")
    events = list(client.train(steps=STEPS, force_promote=True))
    kinds = [type(e) for e in events]
    assert kinds[:2] == [TrainStarted, TrainEvaluation]
    assert kinds.count(TrainProgress) == STEPS
    assert kinds[-2:] == [TrainEvaluation, TrainResult]
    progress = [e for e in events if isinstance(e, TrainProgress)]
    assert [p.step for p in progress] == list(range(1, STEPS + 1))
    result = events[-1]
    assert isinstance(result, TrainResult) and result.promoted and result.adapter_version
    snap = client.stats()
    assert snap.adapter_version == result.adapter_version
    assert snap.training_state == "idle" and snap.pending_cases == 0
    summary = _summary(list(client.generate("Write about the moon.", max_tokens=8)))
    assert summary.adapter_version == result.adapter_version
    metrics = scrape(server.http_address)  # /metrics counts the run and names the adapter
    assert one(metrics, RUNS, outcome="promoted") == promoted_before + 1
    assert one(metrics, "speclora:adapter_info", version=result.adapter_version) == 1

    # Back to the base draft and forward again, over the RPC.
    base = client.activate_adapter("none")
    assert base.version == "" and client.stats().adapter_version == ""
    again = client.activate_adapter(result.adapter_version)
    assert again.version == result.adapter_version and again.active
    rolled = client.activate_adapter(rollback=True)
    assert rolled.version == "" and runtime.worker.hub.adapter_version == ""
    assert {a.adapter_version for a in client.stats().per_adapter} >= {"", result.adapter_version}


def test_generation_keeps_serving_while_training(served: tuple) -> None:
    _, _, client = served
    _record_cases(client, 8)
    events: list[object] = []
    trainer = threading.Thread(target=lambda: events.extend(client.train(steps=STEPS)))
    trainer.start()
    deadline = time.monotonic() + 30
    while client.stats().training_state != "running":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(PreconditionFailed, match="already running"):
        list(client.train(steps=2))
    summary = _summary(list(client.generate("Write about the rain.", max_tokens=8)))
    assert summary.completion_tokens > 0
    trainer.join(120)
    assert isinstance(events[-1], TrainResult)


def test_cancelling_train_stops_it(served: tuple) -> None:
    runtime, _, client = served
    _record_cases(client, 8)
    before = runtime.learning.adapters.versions()
    stream = client.train(steps=10_000)
    assert isinstance(next(stream), TrainStarted)
    stream.close()
    deadline = time.monotonic() + 30
    while client.stats().training_state == "running":
        assert time.monotonic() < deadline, "training did not stop"
        time.sleep(0.02)
    assert runtime.learning.adapters.versions() == before  # nothing written


def test_train_with_too_few_cases_is_a_precondition(tmp_path: Path, served: tuple) -> None:
    runtime, _, client = served
    runtime.learning.store.purge()
    with pytest.raises(PreconditionFailed, match="failure cases"):
        list(client.train())


def test_cli_train_json_and_progress(served: tuple) -> None:
    from click.testing import CliRunner
    from speclora.client.cli import main

    _, _, client = served
    _record_cases(client, 8)
    args = ["train", "--steps", "3", "--force-promote", "--address", client.address]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])  # the daemon logs here too
    assert out["promoted"] and out["adapter_version"] and len(out["losses"]) == 3
    assert {"acceptance_before", "acceptance_after", "train_cases", "heldout_cases"} <= set(out)
    _record_cases(client, 8)
    human = CliRunner().invoke(main, args)
    assert human.exit_code == 0, human.output
    assert "held-out acceptance before" in human.output and "promoted" in human.output
