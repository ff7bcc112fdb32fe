"""The history's persistence and its place in the daemon: the SQLite store (durable, bounded,
private, really purged), the History that feeds the index from the worker, and the worker's
hook (every finished request is recorded unless told not to). In-process daemons with tiny
models; tests/test_history_daemon.py kills real daemon processes."""

from __future__ import annotations

import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.daemons import LocalDaemon, local_daemon, wait_until
from speclora.client.commands.history import history_group
from speclora.daemon.learning.history_recorder import History
from speclora.daemon.learning.history_store import HistoryRecord, HistoryStore, encode_tokens
from speclora.shared.config import HistoryConfig
from speclora.shared.pb import speclora_pb2 as pb
from structlog.testing import capture_logs

SECRET = tuple(range(7001, 7041))  # 40 distinctive token ids: their bytes must vanish on purge


def file_bytes(path: Path) -> bytes:
    """The database and its WAL as raw bytes, as anyone reading the disk would see them."""
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())


def record(target: str, prompt: tuple[int, ...], completion: tuple[int, ...]) -> HistoryRecord:
    return HistoryRecord(target, prompt, completion)


# --------------------------------------------------------------------------- the store


def test_rows_survive_reopening_per_target_and_in_order(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    with HistoryStore(path) as store:
        store.add(record("a", (1, 2), (3,)))
        store.add_many([record("b", (9,), (8, 7)), record("a", (4,), (5, 6))])
    with HistoryStore(path) as store:
        assert [(r.prompt_ids, r.completion_ids) for r in store.records("a")] == [
            ((1, 2), (3,)),
            ((4,), (5, 6)),
        ]
        assert [r.completion_ids for r in store.records("b")] == [(8, 7)]
        assert store.stats().per_target == {"a": (2, 6), "b": (1, 3)}
        assert list(store.iter_blobs("a"))[1] == (encode_tokens((4,)), encode_tokens((5, 6)))


def test_the_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    with HistoryStore(path) as store:
        store.add(record("a", (1,), (2,)))
        for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            if p.exists():
                assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def test_each_target_is_bounded_by_max_tokens_oldest_first(tmp_path: Path) -> None:
    with HistoryStore(tmp_path / "h.sqlite3", max_tokens=100) as store:
        for i in range(10):
            store.add(record("a", (i,) * 10, (i,) * 10))  # 20 tokens each
        store.add(record("b", (99,) * 30, (99,) * 30))  # another target has its own bound
        kept = store.records("a")
        assert [r.prompt_ids[0] for r in kept] == [5, 6, 7, 8, 9]
        store.add(record("a", (50,) * 150, (51,)))  # larger than the bound: kept alone
        assert [r.prompt_ids[0] for r in store.records("a")] == [50]
        assert store.stats().per_target["b"] == (1, 60)


def test_purge_really_removes_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    with HistoryStore(path) as store:
        for _ in range(20):
            store.add(record("a", SECRET, (1, 2, 3)))
        assert encode_tokens(SECRET) in file_bytes(path)  # the check below can fail
        epoch = store.epoch()
        assert store.purge() == 20
        assert store.records() == [] and store.epoch() == epoch + 1
        assert store.integrity_check() == "ok"
    assert encode_tokens(SECRET) not in file_bytes(path)


def test_rows_dropped_by_the_bound_are_overwritten_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    with HistoryStore(path, max_tokens=1_000) as store:
        store.add(record("a", SECRET, (1,)))  # 41 tokens
        for i in range(10):  # 101 tokens each: the tenth pushes the secret out
            store.add(record("a", (i,) * 100, (i,)))
        assert all(r.prompt_ids != SECRET for r in store.records())
        store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # only the main file is left
    # Without secure_delete (Debian builds SQLite with it on; the store sets it everywhere)
    # its bytes would stay in the page's free space until reused.
    assert encode_tokens(SECRET) not in file_bytes(path)


def test_a_write_after_a_purge_it_did_not_see_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    with HistoryStore(path) as daemon_side, HistoryStore(path) as cli_side:
        epoch = daemon_side.epoch()
        cli_side.purge()
        ids, now = daemon_side.add_many([record("a", (1,), (2,))], unless_purged_since=epoch)
        assert ids == [] and now == epoch + 1 and daemon_side.records() == []


# --------------------------------------------------------------------------- History


@pytest.fixture
def history(tmp_path: Path) -> Iterator[History]:
    store = HistoryStore(tmp_path / "history.sqlite3")
    h = History(HistoryConfig(), "target-a", store, watch_s=0.05)
    yield h
    h.close()
    store.close()


def test_a_recorded_request_counts_once_committed_and_proposes(history: History) -> None:
    prompt, completion = (1, 2, 3, 4, 5), tuple(range(100, 130))
    assert history.record(prompt, completion)
    assert history.flush(10)
    assert history.stats().documents == 1 and history.stats().tokens == 35
    assert [r.completion_ids for r in history.store.records("target-a")] == [completion]
    request = history.for_request([9, 9, 3, 4, 5])
    [proposal] = request.proposals(24, spec_factor=8)
    assert proposal.source == "history" and proposal.tokens == completion[:24]


def test_a_new_history_loads_what_the_last_one_committed(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    with HistoryStore(path) as store:
        first = History(HistoryConfig(), "target-a", store)
        first.record((1, 2, 3), (10, 11, 12, 13))
        first.record((7, 7, 7), (20, 21))
        first.close()
    with HistoryStore(path) as store:
        other = History(HistoryConfig(), "target-b", store)  # another target sees none of it
        assert other.load() == 0
        again = History(HistoryConfig(), "target-a", store)
        assert again.load() == 2 and again.stats().tokens == 12
        assert again.index.propose([1, 2, 3], 8, spec_factor=4).tokens == (10, 11, 12, 13)
        other.close()
        again.close()


def test_purge_deletes_the_rows_and_the_memory(history: History) -> None:
    for _ in range(5):
        history.record(SECRET, (1, 2, 3))
    # No flush: a purge waits for the writer, so what was recorded before it goes too.
    assert history.purge() == 5
    assert history.stats().documents == 0 and history.index.propose(SECRET, 4) is None
    assert encode_tokens(SECRET) not in file_bytes(history.store.path)
    history.record((4, 5), (6,))
    assert history.flush(10) and history.stats().documents == 1


def test_a_purge_by_another_process_empties_the_memory(history: History) -> None:
    history.record(SECRET, (1, 2, 3))
    assert history.flush(10) and history.stats().documents == 1
    with capture_logs() as logs, HistoryStore(history.store.path) as cli:
        cli.purge()
        wait_until(lambda: history.stats().documents == 0, what="the daemon notices the purge")
    assert history.index.propose(SECRET, 4) is None
    assert any(e["event"] == "history_purged_elsewhere" for e in logs)


def test_a_failing_disk_drops_the_request_and_serving_goes_on(
    history: History, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(history.store, "add_many", full_disk)
    with capture_logs() as logs:
        assert history.record((1, 2), (3, 4))  # queued: the caller never waits for the disk
        assert history.flush(10)
    assert history.stats().documents == 0 and history.stats().dropped == 1
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["history_store_write_failed"]
    monkeypatch.undo()
    history.record((1, 2), (3, 4))
    assert history.flush(10) and history.stats().documents == 1


def test_without_persistence_a_request_counts_at_once() -> None:
    h = History(HistoryConfig(persist=False), "t", None)
    assert h.record((1, 2, 3), (4, 5))
    assert h.stats().documents == 1 and h.index.propose([2, 3], 4).tokens == (4, 5)
    assert h.purge() == 1 and h.stats().documents == 0


# --------------------------------------------------------------------------- in the daemon


def tiny_daemon(home: Path, tiny_paths: tuple[Path, Path], **sections: dict) -> LocalDaemon:
    target = tiny_paths[0]
    return local_daemon(home, {"models": {"target": str(target), "draft": "self:2"}, **sections})


def generate(d: LocalDaemon, prompt: str, **fields: object) -> pb.GenerationSummary:
    events = list(d.stub.Generate(pb.GenerateRequest(prompt=prompt, max_tokens=12, **fields)))
    assert events[-1].HasField("summary")
    return events[-1].summary


def history_of(d: LocalDaemon) -> History:
    assert d.worker.hub.history is not None
    return d.worker.hub.history


def test_every_finished_request_is_recorded_and_counted_in_stats(
    tiny_paths: tuple[Path, Path], tmp_path: Path
) -> None:
    d = tiny_daemon(tmp_path / "home", tiny_paths)
    try:
        for i in range(3):
            generate(d, f"Tell me about the number {i}.")
        generate(d, "Not this one.", record=False)
        h = history_of(d)
        assert h.flush(10)
        assert h.stats().documents == 3
        snap = d.server.servicer.snapshot()
        assert (snap.history.documents, snap.history.tokens) == (3, h.stats().tokens)
        assert snap.history.bytes == h.index.nbytes > 0
        # What is stored is what the target wrote, after its prompt: the index proposes it.
        [*_, last] = h.store.records(d.worker.hub.target_id)
        continuing = h.for_request(list(last.prompt_ids) + list(last.completion_ids[:2]))
        [proposal] = [p for p in continuing.proposals(24, spec_factor=16) if p.source == "history"]
        assert proposal.tokens[:4] == last.completion_ids[2:6]
    finally:
        d.close()


def test_learning_record_off_records_nothing(tiny_paths: tuple[Path, Path], tmp_path: Path) -> None:
    d = tiny_daemon(tmp_path / "home", tiny_paths, learning={"record": False})
    try:
        generate(d, "Anything at all.")
        h = history_of(d)
        assert h.flush(10) and h.stats().documents == 0 and h.store.records() == []
    finally:
        d.close()


def test_history_disabled_keeps_no_file(tiny_paths: tuple[Path, Path], tmp_path: Path) -> None:
    d = tiny_daemon(tmp_path / "home", tiny_paths, history={"enabled": False})
    try:
        generate(d, "Anything at all.")
        assert d.worker.hub.history is None
        assert not d.paths.history_database.exists()
    finally:
        d.close()


def test_another_target_does_not_see_the_history(
    tiny_paths: tuple[Path, Path], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    d = tiny_daemon(home, tiny_paths)
    try:
        generate(d, "Remember this prompt.")
        assert history_of(d).flush(10)
        first_target = d.worker.hub.target_id
    finally:
        d.close()
    # The unrelated tiny draft model as the target: same tokenizer, other weights.
    other = local_daemon(home, {"models": {"target": str(tiny_paths[1]), "draft": "none"}})
    try:
        assert other.worker.hub.target_id != first_target
        assert history_of(other).stats().documents == 0
        generate(other, "Something else.")
        assert history_of(other).flush(10)
    finally:
        other.close()
    again = tiny_daemon(home, tiny_paths)
    try:
        assert history_of(again).stats().documents == 1  # its own, not the other target's
    finally:
        again.close()


def test_purge_through_the_learning_loop_and_the_cli(
    tiny_paths: tuple[Path, Path], tmp_path: Path
) -> None:
    from click.testing import CliRunner

    home = tmp_path / "home"
    d = tiny_daemon(home, tiny_paths)
    try:
        for i in range(2):
            generate(d, f"Secret prompt number {i}.")
        h = history_of(d)
        assert h.flush(10) and h.stats().documents == 2
        [first, _] = h.store.records()
        secret = encode_tokens(first.prompt_ids)
        assert secret in file_bytes(d.paths.history_database)
        assert d.runtime is not None and d.runtime.learning.purge_history() == 2
        assert h.stats().documents == 0
        assert secret not in file_bytes(d.paths.history_database)
        # The CLI, on the file directly, while this daemon runs: it forgets within a second.
        generate(d, "Secret prompt number 0.")
        assert h.flush(10) and h.stats().documents == 1
        result = CliRunner().invoke(
            history_group, ["purge", "--yes"], env={"SPECLORA_HOME": str(home)}
        )
        assert result.exit_code == 0 and "Deleted 1 past request" in result.output
        wait_until(lambda: h.stats().documents == 0, timeout=10, what="the daemon forgets")
        assert secret not in file_bytes(d.paths.history_database)
    finally:
        d.close()


def test_recording_happens_off_the_worker_thread(
    tiny_paths: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow disk holds back nothing: the summary and the next request go out meanwhile."""
    d = tiny_daemon(tmp_path / "home", tiny_paths)
    try:
        h = history_of(d)
        gate = threading.Event()
        write = h.store.add_many

        def slow_disk(*args: object, **kwargs: object):
            gate.wait(30)
            return write(*args, **kwargs)

        monkeypatch.setattr(h.store, "add_many", slow_disk)
        start = time.monotonic()
        generate(d, "One.")
        generate(d, "Two.")
        assert time.monotonic() - start < 25
        assert h.stats().documents == 0 and h.stats().pending == 2  # not committed: not counted
        gate.set()
        assert h.flush(10) and h.stats().documents == 2
    finally:
        d.close()
