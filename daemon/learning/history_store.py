"""The history store: past requests' prompt and completion token ids, durably in SQLite.

The history drafter (engine/history.py) proposes from what the target wrote before; this file
is what it remembers across restarts. One row per finished request, keyed by the target's
identity (another target never loads it), committed with `synchronous=FULL` before the request
counts, bounded per target by `history.max_tokens` (oldest rows deleted first, and with
`secure_delete` their bytes are overwritten, not left in free pages). `purge` deletes every row,
vacuums and truncates the WAL so the prompts are really gone from the file, and bumps a purge
epoch that a running daemon watches, so a purge from another process (the CLI) also empties
the daemon's memory.

A sibling file of the failure database (`history.sqlite3`), so either can be purged, capped or
moved away on its own. Token ids are stored as little-endian int32 blobs: 4 bytes a token,
and a million tokens load in a fraction of a second. Stdlib only: the CLI reads this module.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
import threading
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
from speclora.daemon.learning.store import StoreError, Transaction

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    target_id TEXT NOT NULL,
    prompt BLOB NOT NULL,
    completion BLOB NOT NULL,
    tokens INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS documents_by_target ON documents (target_id, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def encode_tokens(tokens: Sequence[int]) -> bytes:
    """Token ids as little-endian int32 bytes."""
    arr = array("i", (int(t) for t in tokens))
    if sys.byteorder != "little":
        arr.byteswap()
    return arr.tobytes()


def decode_tokens(blob: bytes) -> list[int]:
    arr = array("i")
    arr.frombytes(blob)
    if sys.byteorder != "little":
        arr.byteswap()
    return arr.tolist()


@dataclass(frozen=True)
class HistoryRecord:
    """One finished request as stored."""

    target_id: str
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    created_at: float = 0.0
    id: int | None = None

    @property
    def tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass(frozen=True)
class HistoryStoreStats:
    documents: int
    tokens: int
    per_target: dict[str, tuple[int, int]]  # target id -> (documents, tokens)
    oldest: float | None
    newest: float | None
    file_bytes: int  # the database, its WAL and shared-memory files


class HistoryStore:
    """Thread-safe access to the history database (one connection, one lock).

    The daemon writes from its history writer thread; the CLI may open the same file to show
    stats or purge (WAL lets them proceed together; `busy_timeout` makes a writer wait)."""

    def __init__(
        self, path: str | Path, max_tokens: int = 1_000_000, *, busy_timeout_s: float = 10.0
    ) -> None:
        self.path = Path(path)
        self.max_tokens = max_tokens
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # SQLite creates -wal and -shm with the database file's mode, and they hold the
            # prompts too: create the file 0600 before SQLite does.
            with contextlib.suppress(OSError):
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            self._db = sqlite3.connect(
                str(self.path),
                timeout=busy_timeout_s,
                check_same_thread=False,
                isolation_level=None,  # explicit BEGIN/COMMIT
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # committed = on disk
            self._db.execute("PRAGMA secure_delete=ON")  # deleted rows are overwritten
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} was written by a newer SpecLoRA (schema {version}); upgrade "
                    "speclora or move the file away"
                )
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open history database {self.path}: {exc}") from exc
        for p in self._files():
            with contextlib.suppress(OSError):
                p.chmod(0o600)

    def _files(self) -> tuple[Path, ...]:
        return (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm"))

    # -- writing ------------------------------------------------------------------------

    def add_many(
        self, records: Sequence[HistoryRecord], *, unless_purged_since: int | None = None
    ) -> tuple[list[int], int]:
        """Store records in one transaction (one fsync); drop each target's oldest rows past
        `max_tokens`. Returns (their ids, the purge epoch).

        With `unless_purged_since`, nothing is written when the purge epoch has moved past it:
        the caller learned of these requests before that purge, which must delete them too.
        The check and the insert are one transaction, so no purge can fall between them."""
        ids: list[int] = []
        with self._lock, Transaction(self._db):
            epoch = self._epoch()
            if unless_purged_since is not None and epoch != unless_purged_since:
                return ids, epoch
            now = time.time()
            for r in records:
                cur = self._db.execute(
                    "INSERT INTO documents (created_at, target_id, prompt, completion, tokens) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (
                        r.created_at or now,
                        r.target_id,
                        encode_tokens(r.prompt_ids),
                        encode_tokens(r.completion_ids),
                        r.tokens,
                    ),
                )
                ids.append(int(cur.lastrowid))
            for target in {r.target_id for r in records}:
                self._enforce_cap(target)
        return ids, epoch

    def add(self, record: HistoryRecord) -> int:
        return self.add_many([record])[0][0]

    def _enforce_cap(self, target_id: str) -> None:
        # Keep the newest rows whose tokens add up to max_tokens (and always the newest one).
        cur = self._db.execute(
            "DELETE FROM documents WHERE id IN ("
            " SELECT id FROM ("
            "  SELECT id, SUM(tokens) OVER (ORDER BY id DESC) AS newer,"
            "         ROW_NUMBER() OVER (ORDER BY id DESC) AS age"
            "  FROM documents WHERE target_id = ?)"
            " WHERE newer > ? AND age > 1)",
            (target_id, self.max_tokens),
        )
        if cur.rowcount > 0:
            log.debug("history_store_capped", dropped=cur.rowcount, max_tokens=self.max_tokens)

    def purge(self) -> int:
        """Delete every row of every target for good; returns how many. Bumps the epoch."""
        with self._lock:
            with Transaction(self._db):
                deleted = self._db.execute("DELETE FROM documents").rowcount
                self._db.execute(
                    "INSERT INTO meta (key, value) VALUES ('purge_epoch', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (str(self._epoch() + 1),),
                )
            # VACUUM rewrites the file; the checkpoint empties the WAL, which held rows too.
            self._db.execute("VACUUM")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        log.info("history_store_purged", deleted=deleted)
        return deleted

    # -- reading ------------------------------------------------------------------------

    def epoch(self) -> int:
        """How many purges this file has seen (a running daemon compares it)."""
        with self._lock:
            return self._epoch()

    def _epoch(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'purge_epoch'").fetchone()
        return int(row[0]) if row else 0

    def changed(self) -> int:
        """SQLite's data_version: it moves when another connection commits, so a watcher can
        skip reading anything while it stays put."""
        with self._lock:
            return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def iter_blobs(self, target_id: str, batch: int = 512) -> Iterator[tuple[bytes, bytes]]:
        """(prompt, completion) blobs of a target's rows, oldest first."""
        last = 0
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT id, prompt, completion FROM documents WHERE target_id = ? AND id > ? "
                    "ORDER BY id LIMIT ?",
                    (target_id, last, batch),
                ).fetchall()
            if not rows:
                return
            for _, prompt, completion in rows:
                yield prompt, completion
            last = rows[-1][0]

    def records(self, target_id: str | None = None) -> list[HistoryRecord]:
        """Every row (of one target), oldest first, decoded."""
        where, args = ("WHERE target_id = ?", (target_id,)) if target_id is not None else ("", ())
        with self._lock:
            rows = self._db.execute(
                "SELECT id, created_at, target_id, prompt, completion FROM documents "
                f"{where} ORDER BY id",
                args,
            ).fetchall()
        return [
            HistoryRecord(r[2], tuple(decode_tokens(r[3])), tuple(decode_tokens(r[4])), r[1], r[0])
            for r in rows
        ]

    def stats(self) -> HistoryStoreStats:
        with self._lock:
            per_target = {
                r[0]: (int(r[1]), int(r[2]))
                for r in self._db.execute(
                    "SELECT target_id, COUNT(*), COALESCE(SUM(tokens), 0) FROM documents "
                    "GROUP BY target_id ORDER BY target_id"
                )
            }
            oldest, newest = self._db.execute(
                "SELECT MIN(created_at), MAX(created_at) FROM documents"
            ).fetchone()
        return HistoryStoreStats(
            documents=sum(d for d, _ in per_target.values()),
            tokens=sum(t for _, t in per_target.values()),
            per_target=per_target,
            oldest=oldest,
            newest=newest,
            file_bytes=sum(p.stat().st_size for p in self._files() if p.exists()),
        )

    def integrity_check(self) -> str:
        with self._lock:
            return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
