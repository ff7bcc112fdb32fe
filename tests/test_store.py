"""Failure store and recorder: durable, capped, exportable, purgeable, never on the token path."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from speclora.daemon.engine.events import GenerationRequest, GenerationSummary, SamplingParams
from speclora.daemon.learning.recorder import FailureRecorder, is_failure
from speclora.daemon.learning.store import FailureCase, FailureStore
from speclora.shared.config import LearningConfig
from structlog.testing import capture_logs


def make_case(i: int, **kw: object) -> FailureCase:
    fields: dict[str, object] = dict(
        prompt_ids=(1, 2, 3, i),
        completion_ids=(4, 5, 6, 7, i),
        from_draft=(True, False, False, True, False),
        rejection_positions=(1, 2),
        proposed=8,
        accepted=2,
        temperature=0.0,
        target_id="tgt",
        draft_id="self:2",
        request_id=f"req-{i}",
    )
    fields.update(kw)
    return FailureCase(**fields)  # type: ignore[arg-type]


def make_summary(
    proposed: int = 10, accepted: int = 1, n: int = 6, history: tuple[int, int] = (0, 0)
) -> GenerationSummary:
    """`proposed`/`accepted` are the model draft's; `history` = (proposed, accepted) by history."""
    return GenerationSummary(
        prompt_tokens=3,
        completion_tokens=n,
        proposed=proposed + history[0],
        accepted=accepted + history[1],
        draft_proposed=proposed,
        draft_accepted=accepted,
        history_proposed=history[0],
        history_accepted=history[1],
        target_passes=n,
        time_to_first_token_s=0.01,
        tokens_per_second=10.0,
        total_time_s=0.5,
        finish_reason="length",
        mode="detailed",
        prompt_token_ids=(10, 11, 12),
        completion_token_ids=tuple(range(20, 20 + n)),
        from_draft=(False,) * n,
        rejection_positions=(0, 2),
        sampling=SamplingParams(temperature=0.7, top_p=0.9, seed=5),
    )


@pytest.fixture
def store(tmp_path: Path) -> FailureStore:
    with FailureStore(tmp_path / "f.sqlite3", cap=100) as s:
        yield s


def test_record_and_read_back(store: FailureStore) -> None:
    ids = [store.add(make_case(i)) for i in range(3)]
    assert ids == sorted(ids)
    case = store.get(ids[1])
    assert case is not None
    assert case.prompt_ids == (1, 2, 3, 1)
    assert case.completion_ids == (4, 5, 6, 7, 1)
    assert case.from_draft == (True, False, False, True, False)
    assert case.rejection_positions == (1, 2)
    assert case.acceptance == pytest.approx(0.25)
    assert (case.target_id, case.draft_id, case.request_id) == ("tgt", "self:2", "req-1")
    assert [c.id for c in store.list()] == ids[::-1]  # newest first
    assert [c.id for c in store.recent(2)] == ids[1:]  # newest two, oldest first
    assert store.get(9999) is None
    assert store.integrity_check() == "ok"
    assert oct(store.path.stat().st_mode & 0o777) == "0o600"


def test_cap_drops_oldest_first(tmp_path: Path) -> None:
    with FailureStore(tmp_path / "f.sqlite3", cap=5) as s:
        ids = s.add_many([make_case(i) for i in range(8)])
        assert s.count() == 5
        assert s.ids() == ids[3:]


def test_pending_counts_cases_since_last_training(store: FailureStore) -> None:
    ids = store.add_many([make_case(i) for i in range(4)])
    assert store.pending_count() == 4
    store.mark_trained(ids[2])
    assert store.pending_count() == 1
    stats = store.stats()
    assert (stats.cases, stats.pending) == (4, 1)
    assert stats.mean_acceptance == pytest.approx(0.25)
    assert stats.prompt_tokens == 16 and stats.completion_tokens == 20
    assert stats.per_adapter == {"": 4}


def test_export_jsonl(store: FailureStore, tmp_path: Path) -> None:
    store.add_many([make_case(i) for i in range(3)])
    out = tmp_path / "cases.jsonl"
    assert store.export_jsonl(out) == 3
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["request_id"] for r in rows] == ["req-0", "req-1", "req-2"]
    assert rows[0]["completion_ids"] == [4, 5, 6, 7, 0]
    assert rows[0]["acceptance"] == pytest.approx(0.25)


def test_purge_really_deletes(store: FailureStore) -> None:
    marker = "PRIVATE-PROMPT-MARKER"
    store.add_many([make_case(i, request_id=f"{marker}-{i}") for i in range(50)])
    assert store.purge() == 50
    assert store.count() == 0
    for suffix in ("", "-wal"):
        path = Path(f"{store.path}{suffix}")
        if path.exists():
            assert marker.encode() not in path.read_bytes(), f"{path.name} still holds prompts"
    assert store.integrity_check() == "ok"


def test_failure_rule() -> None:
    config = LearningConfig(failure_threshold=0.5)
    req = GenerationRequest(prompt="x")
    assert is_failure(make_summary(10, 1), req, config)
    assert not is_failure(make_summary(10, 6), req, config)  # accepted enough
    assert not is_failure(make_summary(0, 0), req, config)  # no speculation: nothing to learn
    # Only the model draft's own proposals count: history carrying a request does not hide
    # that the draft got it wrong, and history alone says nothing about the draft.
    assert is_failure(make_summary(10, 1, history=(40, 40)), req, config)
    assert not is_failure(make_summary(0, 0, history=(40, 2)), req, config)
    assert not is_failure(make_summary(10, 1), GenerationRequest(prompt="x", record=False), config)
    assert not is_failure(make_summary(10, 1), req, LearningConfig(record=False))


def test_recorder_writes_failures_in_background(store: FailureStore) -> None:
    recorder = FailureRecorder(store, LearningConfig())
    req = GenerationRequest(prompt="x", request_id="r1")
    assert recorder.offer(make_summary(), req, "tgt", "drf", "v0001")
    assert not recorder.offer(make_summary(10, 9), req, "tgt", "drf", "v0001")
    assert recorder.flush(10)
    (case,) = store.list()
    assert case.completion_ids == tuple(range(20, 26))
    assert case.rejection_positions == (0, 2)
    assert (case.temperature, case.top_p, case.seed) == (0.7, 0.9, 5)
    assert (case.target_id, case.draft_id, case.adapter_version) == ("tgt", "drf", "v0001")
    assert case.request_id == "r1"
    assert recorder.close()


class _SlowStore:
    """A store whose writes take long, as on a slow or busy disk."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.written: list[FailureCase] = []

    def add_many(self, cases: list[FailureCase]) -> list[int]:
        self.release.wait(10)
        self.written.extend(cases)
        return list(range(len(cases)))


def test_offer_never_blocks_on_a_slow_disk() -> None:
    slow = _SlowStore()
    recorder = FailureRecorder(slow, LearningConfig(), queue_size=4)  # type: ignore[arg-type]
    req = GenerationRequest(prompt="x")
    start = time.perf_counter()
    results = [recorder.offer(make_summary(), req, "t", "d", "") for _ in range(20)]
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, f"offer blocked for {elapsed:.3f}s"
    assert results[0] and not all(results)  # queue full: dropped, not waited for
    slow.release.set()
    assert recorder.flush(10)
    assert len(slow.written) == sum(results)
    recorder.close()


class _FullDisk:
    def add_many(self, cases: list[FailureCase]) -> list[int]:
        raise sqlite3.OperationalError("database or disk is full")


def test_disk_full_is_logged_once_and_serving_continues() -> None:
    recorder = FailureRecorder(_FullDisk(), LearningConfig())  # type: ignore[arg-type]
    req = GenerationRequest(prompt="x")
    with capture_logs() as logs:
        for _ in range(5):
            recorder.offer(make_summary(), req, "t", "d", "")
            assert recorder.flush(10)
    errors = [e for e in logs if e["event"] == "failure_store_write_failed"]
    assert len(errors) == 1
    assert "disk is full" in errors[0]["error"]
    assert recorder.dropped == 5
    assert recorder.close()


_WRITER = textwrap.dedent(
    """
    import sys, time
    import speclora.daemon.blas
    from speclora.daemon.engine.events import GenerationRequest, GenerationSummary
    from speclora.daemon.learning.recorder import FailureRecorder
    from speclora.daemon.learning.store import FailureStore
    from speclora.shared.config import LearningConfig

    def report(ids):
        sys.stdout.write("".join(f"{i}\\n" for i in ids))
        sys.stdout.flush()

    store = FailureStore(sys.argv[1], cap=100000)
    recorder = FailureRecorder(store, LearningConfig(), on_commit=report)
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    n = 0
    while True:
        n += 1
        s = GenerationSummary(3, 40, 40, 2, 40, 0.0, 1.0, 1.0, "length", "detailed",
                              prompt_token_ids=tuple(range(n % 50 + 3)),
                              completion_token_ids=tuple(range(40)),
                              rejection_positions=(1, 5, 9), draft_proposed=40,
                              draft_accepted=2)
        recorder.offer(s, GenerationRequest(prompt="p", request_id=f"r{n}"), "t", "d", "")
        time.sleep(0.001)
    """
)


def test_kill_9_loses_no_committed_case(tmp_path: Path) -> None:
    db = tmp_path / "failures.sqlite3"
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    reported: set[int] = set()
    rng = random.Random(7)
    for _ in range(6):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(db)],
            stdout=subprocess.PIPE,
            text=True,
            env=os.environ.copy(),
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.2, 0.8))  # kill at an arbitrary point mid-write
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        reported.update(int(line) for line in out.split() if line.isdigit())
        with FailureStore(db) as s:
            assert s.integrity_check() == "ok"
            missing = reported - set(s.ids())
            assert not missing, f"{len(missing)} committed cases lost after kill -9"
    assert len(reported) > 50  # the writer really was writing when killed
