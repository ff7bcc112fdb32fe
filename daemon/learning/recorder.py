"""Decide which finished generations are failure cases and write them off the token path.

The worker calls `offer` right after a generation's summary; it only builds a small dataclass
and puts it on a bounded queue, so it never waits for SQLite or the disk. A background thread
writes queued cases in batches (one transaction, one fsync per burst). When the disk is full or
the database is broken the error is logged once per streak, the case is dropped, and serving
carries on. Each offer can carry an `on_stored(committed)` callback, called once its case is
durably committed (True) or dropped (False): the daemon tells a client "recorded" only then,
so a kill -9 can never lose a case a client was told about.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from speclora.daemon.engine.events import GenerationRequest, GenerationSummary
from speclora.daemon.learning.store import FailureCase, FailureStore
from speclora.shared.config import LearningConfig

log = structlog.get_logger(__name__)

_STOP = object()


@dataclass(frozen=True)
class _Offered:
    case: FailureCase
    on_stored: Callable[[bool], None] | None


def is_failure(
    summary: GenerationSummary, request: GenerationRequest, config: LearningConfig
) -> bool:
    """A request is worth learning from when the model draft proposed and was mostly rejected.

    Only the model draft's own proposals count: history's are not what LoRA trains, and a
    request that history carried can still be one the draft got wrong."""
    return (
        config.record
        and request.record
        and summary.draft_proposed > 0
        and summary.completion_tokens > 0
        and summary.draft_acceptance_rate < config.failure_threshold
    )


def case_from_summary(
    summary: GenerationSummary,
    request: GenerationRequest,
    target_id: str,
    draft_id: str,
    adapter_version: str,
) -> FailureCase:
    s = summary.sampling
    return FailureCase(
        prompt_ids=tuple(summary.prompt_token_ids),
        completion_ids=tuple(summary.completion_token_ids),
        from_draft=tuple(summary.from_draft),
        rejection_positions=tuple(summary.rejection_positions),
        proposed=summary.draft_proposed,
        accepted=summary.draft_accepted,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        seed=s.seed,
        mode=summary.mode,
        finish_reason=summary.finish_reason,
        target_id=target_id,
        draft_id=draft_id,
        adapter_version=adapter_version,
        request_id=request.request_id,
        created_at=time.time(),
    )


class FailureRecorder:
    """Bounded queue plus one writer thread in front of a FailureStore."""

    def __init__(
        self,
        store: FailureStore,
        config: LearningConfig,
        *,
        queue_size: int = 256,
        on_commit: Callable[[list[int]], None] | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._on_commit = on_commit
        self._idle = threading.Condition()
        self._unfinished = 0  # queued or being written
        self._failing = False  # inside a streak of write errors (log once per streak)
        self.committed = 0
        self.dropped = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="failure-recorder", daemon=True)
        self._thread.start()

    def offer(
        self,
        summary: GenerationSummary,
        request: GenerationRequest,
        target_id: str,
        draft_id: str,
        adapter_version: str,
        *,
        on_stored: Callable[[bool], None] | None = None,
    ) -> bool:
        """Queue the request as a failure case if it is one; True when queued. Never blocks.

        When queued, `on_stored(committed)` is later called once from the writer thread: True
        after the case's transaction committed, False if the write failed and it was dropped."""
        if self._closed or not is_failure(summary, request, self.config):
            return False
        case = case_from_summary(summary, request, target_id, draft_id, adapter_version)
        with self._idle:
            self._unfinished += 1
        try:
            self._queue.put_nowait(_Offered(case, on_stored))
        except queue.Full:
            self._done(1)
            self.dropped += 1
            log.warning("failure_case_dropped", reason="recorder queue full")
            return False
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued case is written (or dropped); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._unfinished:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float | None = 10.0) -> bool:
        """Write what is queued, stop the thread. Returns False if it did not finish in time."""
        if self._closed:
            return True
        self._closed = True
        flushed = self.flush(timeout)
        self._queue.put(_STOP)
        self._thread.join(timeout)
        return flushed and not self._thread.is_alive()

    @property
    def pending(self) -> int:
        """Cases queued but not yet written."""
        return self._unfinished

    def _done(self, n: int) -> None:
        with self._idle:
            self._unfinished -= n
            if not self._unfinished:
                self._idle.notify_all()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch = [item]
            stop = False
            while True:  # drain what is already queued into the same transaction
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True
                    break
                batch.append(more)
            self._write(batch)  # type: ignore[arg-type]
            if stop:
                return

    def _write(self, batch: list[_Offered]) -> None:
        committed = False
        try:
            ids = self.store.add_many([item.case for item in batch])
        except Exception as exc:  # disk full, read-only fs, corrupt file: never kill serving
            self.dropped += len(batch)
            if not self._failing:
                log.error("failure_store_write_failed", error=str(exc), cases=len(batch))
            self._failing = True
        else:
            committed = True
            self.committed += len(ids)
            if self._failing:
                log.info("failure_store_write_recovered")
            self._failing = False
            log.debug("failure_cases_recorded", ids=ids)
            if self._on_commit is not None:
                try:
                    self._on_commit(ids)
                except Exception:
                    log.exception("failure_commit_callback_failed")
        finally:
            for item in batch:
                if item.on_stored is not None:
                    try:
                        item.on_stored(committed)
                    except Exception:
                        log.exception("failure_stored_callback_failed")
            self._done(len(batch))
