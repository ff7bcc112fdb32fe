"""The daemon's history of one target: the shared SuffixIndex, fed as requests finish, and the
history store that keeps it across restarts.

The worker calls `record` when a generation ends; it only queues the token ids, so it never
waits for SQLite or the disk. A writer thread commits them (one transaction per burst) and
only then adds them to the index: what the index and Stats count has been committed, so it
survives a kill -9. A write error is logged once per streak and the request is not kept;
serving carries on. `purge` runs in the writer thread too, in order with the writes. The
writer also watches the file's purge epoch, so a purge by another process (`speclora history
purge`, `speclora failures purge`) empties this daemon's memory within `watch_s` as well.

With `history.persist` off there is no store and no thread: `record` adds to the index at once.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import structlog
from speclora.daemon.engine.history import RequestHistory, SuffixIndex
from speclora.daemon.learning.history_store import HistoryRecord, HistoryStore
from speclora.shared.config import HistoryConfig

log = structlog.get_logger(__name__)

_STOP = object()


@dataclass(frozen=True)
class HistoryStats:
    """What Stats reports about the history (the in-memory index)."""

    documents: int
    tokens: int
    bytes: int  # memory the index holds
    pending: int  # finished requests queued, not committed yet
    dropped: int  # requests not kept: queue full or a write error


@dataclass
class _Purge:
    done: threading.Event = field(default_factory=threading.Event)
    deleted: int = 0
    error: BaseException | None = None


class History:
    """One target's history: index + store + writer thread. Thread-safe."""

    def __init__(
        self,
        config: HistoryConfig,
        target_id: str,
        store: HistoryStore | None,
        *,
        queue_size: int = 256,
        watch_s: float = 1.0,
    ) -> None:
        self.config = config
        self.target_id = target_id
        self.store = store
        self.index = SuffixIndex(
            config.max_tokens, max_match=config.max_match, min_match=config.min_match
        )
        self.dropped = 0
        self._watch_s = watch_s
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._idle = threading.Condition()
        self._unfinished = 0
        self._failing = False
        self._closed = False
        self._thread: threading.Thread | None = None
        if store is not None:
            self._epoch = store.epoch()
            self._data_version = store.changed()
            self._thread = threading.Thread(target=self._run, name="history-writer", daemon=True)
            self._thread.start()

    # -- the engine's side ----------------------------------------------------------------

    def for_request(self, prompt_ids: Sequence[int]) -> RequestHistory:
        """A generation's own prompt-lookup index, beside this shared one."""
        return RequestHistory(
            prompt_ids, self.index, max_match=self.config.max_match, min_match=self.config.min_match
        )

    def record(self, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> bool:
        """Keep a finished request (its prompt and what the target wrote). Never blocks;
        False when it was not queued (closed, empty, or the queue is full)."""
        if self._closed or not completion_ids:
            return False
        record = HistoryRecord(
            self.target_id, tuple(prompt_ids), tuple(completion_ids), time.time()
        )
        if self._thread is None:
            self.index.add(record.prompt_ids + record.completion_ids)
            return True
        with self._idle:
            self._unfinished += 1
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._done(1)
            self.dropped += 1
            log.warning("history_record_dropped", reason="history queue full")
            return False
        return True

    # -- lifecycle ------------------------------------------------------------------------

    def load(self) -> int:
        """Fill the index from the store (at daemon start); returns the documents loaded."""
        if self.store is None:
            return 0
        start = time.perf_counter()
        docs = [
            np.frombuffer(prompt + completion, dtype="<i4")
            for prompt, completion in self.store.iter_blobs(self.target_id)
        ]
        self.index.add_many(docs)
        log.info(
            "history_loaded",
            target=self.target_id,
            documents=self.index.documents,
            tokens=self.index.tokens,
            index_bytes=self.index.nbytes,
            seconds=round(time.perf_counter() - start, 3),
        )
        return self.index.documents

    def purge(self, timeout: float | None = 60.0) -> int:
        """Delete the history for good: every stored row (every target's) and this index.
        Returns the rows deleted (the index's documents without a store). Waits for the
        writer, so requests recorded before the call are deleted too."""
        if self.store is None:
            deleted = self.index.documents
            self.index.clear()
            log.info("history_purged", deleted=deleted)
            return deleted
        command = _Purge()
        if self._thread is not None and self._thread.is_alive() and not self._closed:
            with self._idle:
                self._unfinished += 1
            self._queue.put(command)
            if not command.done.wait(timeout):
                raise TimeoutError(f"the history purge did not finish within {timeout} s")
        else:
            self._purge(command)
        if command.error is not None:
            raise command.error
        return command.deleted

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued request is committed (or dropped); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._unfinished:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float | None = 10.0) -> bool:
        """Commit what is queued and stop the writer (the store stays open: its owner closes
        it). False if that did not finish in time."""
        if self._closed:
            return True
        self._closed = True
        if self._thread is None:
            return True
        flushed = self.flush(timeout)
        self._queue.put(_STOP)
        self._thread.join(timeout)
        return flushed and not self._thread.is_alive()

    def stats(self) -> HistoryStats:
        index = self.index
        return HistoryStats(
            documents=index.documents,
            tokens=index.tokens,
            bytes=index.nbytes,
            pending=self._unfinished,
            dropped=self.dropped,
        )

    # -- the writer thread ----------------------------------------------------------------

    def _done(self, n: int) -> None:
        with self._idle:
            self._unfinished -= n
            if not self._unfinished:
                self._idle.notify_all()

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self._watch_s)
            except queue.Empty:
                self._watch()
                continue
            batch: list[HistoryRecord] = []
            while True:  # drain what is queued into one transaction, in order
                if isinstance(item, HistoryRecord):
                    batch.append(item)
                else:
                    self._write(batch)
                    batch = []
                    if item is _STOP:
                        return
                    assert isinstance(item, _Purge)
                    self._purge(item)
                    self._done(1)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            self._write(batch)

    def _write(self, batch: list[HistoryRecord]) -> None:
        if not batch:
            return
        assert self.store is not None
        try:
            ids, epoch = self.store.add_many(batch, unless_purged_since=self._epoch)
        except Exception as exc:  # disk full, read-only fs, broken file: never stop serving
            self.dropped += len(batch)
            if not self._failing:
                log.error("history_store_write_failed", error=str(exc), requests=len(batch))
            self._failing = True
        else:
            if self._failing:
                log.info("history_store_write_recovered")
            self._failing = False
            if epoch != self._epoch:
                # Purged by another process before these were written: they go with it.
                self.dropped += len(batch)
                self._purged_elsewhere(epoch)
            else:
                for record in batch:
                    self.index.add(record.prompt_ids + record.completion_ids)
                log.debug("history_recorded", ids=ids)
        finally:
            self._done(len(batch))

    def _purge(self, command: _Purge) -> None:
        assert self.store is not None
        try:
            command.deleted = self.store.purge()
            self.index.clear()
            self._epoch = self.store.epoch()
            self._data_version = self.store.changed()
            log.info("history_purged", deleted=command.deleted)
        except Exception as exc:
            log.error("history_purge_failed", error=str(exc))
            command.error = exc
        finally:
            command.done.set()

    def _watch(self) -> None:
        """Between writes: notice a purge another process made."""
        assert self.store is not None
        try:
            version = self.store.changed()
            if version == self._data_version:
                return
            self._data_version = version
            epoch = self.store.epoch()
        except Exception as exc:
            if not self._failing:
                log.error("history_store_read_failed", error=str(exc))
            self._failing = True
            return
        if epoch != self._epoch:
            self._purged_elsewhere(epoch)

    def _purged_elsewhere(self, epoch: int) -> None:
        self._epoch = epoch
        dropped = self.index.documents
        self.index.clear()
        log.info("history_purged_elsewhere", documents=dropped)
