"""The failure store: requests where the draft did badly, kept durably in SQLite.

Why SQLite (stdlib, WAL): one file, readable by the CLI while the daemon writes, and a commit
survives a kill -9 at any moment. `synchronous=FULL` makes every committed case durable before
`add` returns; the recorder calls it from a background thread, so the fsync never touches the
token path. The buffer is capped (oldest dropped first) and `purge` really deletes: cases are
the user's prompts.

No MLX here: the CLI reads this module directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog
from speclora.daemon.errors import StoreUnavailableError

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    request_id TEXT NOT NULL DEFAULT '',
    prompt_ids TEXT NOT NULL,
    completion_ids TEXT NOT NULL,
    from_draft TEXT NOT NULL,
    rejection_positions TEXT NOT NULL,
    proposed INTEGER NOT NULL,
    accepted INTEGER NOT NULL,
    acceptance REAL NOT NULL,
    temperature REAL NOT NULL,
    top_p REAL NOT NULL,
    top_k INTEGER NOT NULL,
    seed INTEGER,
    mode TEXT NOT NULL DEFAULT '',
    finish_reason TEXT NOT NULL DEFAULT '',
    target_id TEXT NOT NULL DEFAULT '',
    draft_id TEXT NOT NULL DEFAULT '',
    adapter_version TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_COLUMNS = (
    "id",
    "created_at",
    "request_id",
    "prompt_ids",
    "completion_ids",
    "from_draft",
    "rejection_positions",
    "proposed",
    "accepted",
    "acceptance",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "mode",
    "finish_reason",
    "target_id",
    "draft_id",
    "adapter_version",
)
_SEQUENCE_COLUMNS = ("prompt_ids", "completion_ids", "from_draft", "rejection_positions")


class StoreError(StoreUnavailableError):
    """The failure database cannot be opened, read or written (FAILED_PRECONDITION over gRPC);
    the message names the file and the fix."""


# What to do about a damaged or unreadable database, in every message about one.
FIX = (
    "`speclora failures purge --yes` deletes every case and starts a new file; or stop the "
    "daemon and move the file away"
)


@dataclass(frozen=True)
class FailureCase:
    """One recorded request: what the target produced and where the draft went wrong."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    from_draft: tuple[bool, ...] = ()  # per completion token: an accepted draft proposal
    rejection_positions: tuple[int, ...] = ()  # completion indices where a proposal was rejected
    proposed: int = 0
    accepted: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    mode: str = ""
    finish_reason: str = ""
    target_id: str = ""
    draft_id: str = ""
    adapter_version: str = ""
    request_id: str = ""
    created_at: float = field(default_factory=time.time)
    id: int | None = None  # assigned by the store

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def to_json(self) -> dict[str, Any]:
        """A plain dict for export (JSONL) and `failures show --json`."""
        data = asdict(self)
        for key in _SEQUENCE_COLUMNS:
            data[key] = list(data[key])
        data["acceptance"] = self.acceptance
        return data


@dataclass(frozen=True)
class StoreStats:
    cases: int
    pending: int  # recorded since the last training run
    oldest: float | None
    newest: float | None
    mean_acceptance: float
    prompt_tokens: int
    completion_tokens: int
    per_adapter: dict[str, int]  # adapter version ("" = base draft) -> cases
    file_bytes: int


def _row_to_case(row: sqlite3.Row) -> FailureCase:
    seq = {key: tuple(json.loads(row[key])) for key in _SEQUENCE_COLUMNS}
    return FailureCase(
        prompt_ids=seq["prompt_ids"],
        completion_ids=seq["completion_ids"],
        from_draft=tuple(bool(x) for x in seq["from_draft"]),
        rejection_positions=seq["rejection_positions"],
        proposed=row["proposed"],
        accepted=row["accepted"],
        temperature=row["temperature"],
        top_p=row["top_p"],
        top_k=row["top_k"],
        seed=row["seed"],
        mode=row["mode"],
        finish_reason=row["finish_reason"],
        target_id=row["target_id"],
        draft_id=row["draft_id"],
        adapter_version=row["adapter_version"],
        request_id=row["request_id"],
        created_at=row["created_at"],
        id=row["id"],
    )


def _case_values(case: FailureCase) -> tuple[Any, ...]:
    def dump(xs: Sequence[Any]) -> str:
        return json.dumps([int(x) for x in xs], separators=(",", ":"))

    return (
        case.created_at,
        case.request_id,
        dump(case.prompt_ids),
        dump(case.completion_ids),
        dump(case.from_draft),
        dump(case.rejection_positions),
        case.proposed,
        case.accepted,
        case.acceptance,
        float(case.temperature),
        float(case.top_p),
        int(case.top_k),
        case.seed,
        case.mode,
        case.finish_reason,
        case.target_id,
        case.draft_id,
        case.adapter_version,
    )


class FailureStore:
    """Thread-safe access to the failure database (one connection, one lock).

    Several processes may open the same file (the daemon writes, the CLI reads, lists and
    purges); WAL lets readers and one writer proceed together, and `busy_timeout` makes
    the rare writer/writer overlap wait instead of failing.
    """

    def __init__(self, path: str | Path, cap: int = 10_000, *, busy_timeout_s: float = 10.0):
        """Opens the file now; when it cannot (damaged, unreadable) the store still exists, every
        call raises StoreError naming the file and the fix, and the next call tries again."""
        self.path = Path(path)
        self.cap = cap
        self._busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self.error: str = ""  # why the file cannot be used now ("" = it can)
        with self._lock, contextlib.suppress(StoreError):
            self._connect()

    def _connect(self) -> sqlite3.Connection:
        """Open (or reopen) the database; the caller holds the lock."""
        if self._db is not None:
            return self._db
        db = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # SQLite creates -wal and -shm with the database file's mode, and the WAL holds
            # the prompts too: create the file 0600 before SQLite does.
            with contextlib.suppress(OSError):
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            db = sqlite3.connect(
                str(self.path),
                timeout=self._busy_timeout_s,
                check_same_thread=False,
                isolation_level=None,  # explicit BEGIN/COMMIT below
            )
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk when add() returns, even across a power cut.
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} was written by a newer SpecLoRA (schema {version}); upgrade "
                    "speclora or move the file away"
                )
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except (sqlite3.Error, OSError, StoreError) as exc:
            if db is not None:
                db.close()
            error = exc if isinstance(exc, StoreError) else self._damaged(exc)
            self._note_error(str(error))
            raise error from None
        for path in self._files():
            with contextlib.suppress(OSError):
                path.chmod(0o600)  # prompts are private (files made before the 0600 create)
        self._db = db
        if self.error:
            log.info("failure_store_recovered", path=str(self.path))
        self.error = ""
        return db

    def _damaged(self, exc: BaseException) -> StoreError:
        return StoreError(f"the failure database {self.path} cannot be used ({exc}); {FIX}")

    def _note_error(self, error: str) -> None:
        if error != self.error:  # once per streak of the same error, not once per call
            log.error("failure_store_unavailable", path=str(self.path), error=error)
        self.error = error

    def _files(self) -> tuple[Path, Path, Path]:
        return self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")

    @contextmanager
    def _use(self) -> Iterator[sqlite3.Connection]:
        """The connection under the lock; SQLite's errors become StoreError with the fix."""
        with self._lock:
            db = self._connect()
            try:
                yield db
            except sqlite3.DatabaseError as exc:
                if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
                    raise  # disk full: the recorder's own streak handling says so
                error = self._damaged(exc)
                self._note_error(str(error))
                raise error from exc

    # -- writing ------------------------------------------------------------------------

    def add(self, case: FailureCase) -> int:
        """Store one case durably; returns its id. Drops the oldest cases beyond the cap."""
        return self.add_many([case])[0]

    def add_many(self, cases: Sequence[FailureCase]) -> list[int]:
        """Store cases in one transaction (one fsync for a burst); returns their ids."""
        if not cases:
            return []
        placeholders = ",".join("?" * (len(_COLUMNS) - 1))
        sql = f"INSERT INTO cases ({','.join(_COLUMNS[1:])}) VALUES ({placeholders})"
        with self._use() as db, Transaction(db):
            ids = [int(db.execute(sql, _case_values(c)).lastrowid) for c in cases]
            self._enforce_cap(db)
        return ids

    def _enforce_cap(self, db: sqlite3.Connection) -> None:
        count = db.execute("SELECT COUNT(*) FROM cases").fetchone()[0]
        excess = count - self.cap
        if excess > 0:
            db.execute(
                "DELETE FROM cases WHERE id IN (SELECT id FROM cases ORDER BY id LIMIT ?)",
                (excess,),
            )
            log.info("failure_buffer_capped", dropped=excess, cap=self.cap)

    def delete(self, case_id: int) -> bool:
        with self._use() as db, Transaction(db):
            cur = db.execute("DELETE FROM cases WHERE id = ?", (case_id,))
        return cur.rowcount > 0

    def purge(self) -> int:
        """Delete every case and reclaim the space so the prompts are really gone.

        A database that cannot be read is deleted with its -wal and -shm files and started
        afresh: what purge promises (no case left) holds either way."""
        try:
            with self._use() as db:
                with Transaction(db):
                    deleted = db.execute("DELETE FROM cases").rowcount
                    db.execute("DELETE FROM meta WHERE key = 'trained_through_id'")
                # VACUUM rewrites the file; the checkpoint empties the WAL, which held the rows.
                db.execute("VACUUM")
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except StoreError:
            with self._lock:
                if self._db is not None:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.close()
                    self._db = None
                for path in self._files():
                    path.unlink(missing_ok=True)
                self._connect()  # a new, empty file (or the error that stops it)
            log.warning("failure_store_recreated", path=str(self.path))
            return 0
        log.info("failure_store_purged", deleted=deleted)
        return deleted

    def mark_trained(self, through_id: int) -> None:
        """Remember that cases up to `through_id` were seen by a training run (for `pending`)."""
        with self._use() as db, Transaction(db):
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('trained_through_id', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (str(int(through_id)),),
            )

    # -- reading ------------------------------------------------------------------------

    def get(self, case_id: int) -> FailureCase | None:
        with self._use() as db:
            row = db.execute(
                f"SELECT {','.join(_COLUMNS)} FROM cases WHERE id = ?", (case_id,)
            ).fetchone()
            return _row_to_case(row) if row else None

    def list(
        self, limit: int | None = None, offset: int = 0, *, before_id: int | None = None
    ) -> list[FailureCase]:
        """Cases, newest first (only those with an id below `before_id` when given)."""
        with self._use() as db:
            rows = db.execute(
                f"SELECT {','.join(_COLUMNS)} FROM cases WHERE id < ? ORDER BY id DESC "
                "LIMIT ? OFFSET ?",
                (
                    before_id if before_id is not None else 1 << 62,
                    -1 if limit is None else limit,
                    offset,
                ),
            ).fetchall()
            return [_row_to_case(r) for r in rows]

    def recent(self, max_cases: int | None = None) -> list[FailureCase]:
        """The newest `max_cases` cases (all when None), oldest first: training's input."""
        return list(reversed(self.list(limit=max_cases)))

    def iter_all(self, batch: int = 256) -> Iterator[FailureCase]:
        """Every case, oldest first, without holding them all in memory (export)."""
        last = 0
        while True:
            with self._use() as db:
                rows = db.execute(
                    f"SELECT {','.join(_COLUMNS)} FROM cases WHERE id > ? ORDER BY id LIMIT ?",
                    (last, batch),
                ).fetchall()
                cases = [_row_to_case(row) for row in rows]
            if not cases:
                return
            yield from cases
            last = cases[-1].id or 0

    def ids(self) -> list[int]:
        with self._use() as db:
            return [r[0] for r in db.execute("SELECT id FROM cases ORDER BY id")]

    def count(self) -> int:
        with self._use() as db:
            return int(db.execute("SELECT COUNT(*) FROM cases").fetchone()[0])

    def trained_through_id(self) -> int:
        with self._use() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'trained_through_id'").fetchone()
        return int(row[0]) if row else 0

    def pending_count(self) -> int:
        """Cases recorded after the last training run saw the store."""
        through = self.trained_through_id()
        with self._use() as db:
            return int(
                db.execute("SELECT COUNT(*) FROM cases WHERE id > ?", (through,)).fetchone()[0]
            )

    def stats(self) -> StoreStats:
        with self._use() as db:
            row = db.execute(
                "SELECT COUNT(*), MIN(created_at), MAX(created_at), AVG(acceptance), "
                "COALESCE(SUM(json_array_length(prompt_ids)), 0), "
                "COALESCE(SUM(json_array_length(completion_ids)), 0) FROM cases"
            ).fetchone()
            per_adapter = {
                r[0]: int(r[1])
                for r in db.execute(
                    "SELECT adapter_version, COUNT(*) FROM cases GROUP BY adapter_version "
                    "ORDER BY adapter_version"
                )
            }
        size = sum(p.stat().st_size for p in self._files() if p.exists())
        return StoreStats(
            cases=int(row[0]),
            pending=self.pending_count(),
            oldest=row[1],
            newest=row[2],
            mean_acceptance=float(row[3] or 0.0),
            prompt_tokens=int(row[4]),
            completion_tokens=int(row[5]),
            per_adapter=per_adapter,
            file_bytes=size,
        )

    def integrity_check(self) -> str:
        """SQLite's own consistency check; "ok" when the file is sound."""
        with self._use() as db:
            return str(db.execute("PRAGMA integrity_check").fetchone()[0])

    def export_jsonl(self, path: str | Path) -> int:
        """Write every case as one JSON object per line (the seed's format); returns the count."""
        target = Path(path)
        n = 0
        tmp = target.with_name(f".{target.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as out:
            for case in self.iter_all():
                out.write(json.dumps(case.to_json(), separators=(",", ":")) + "\n")
                n += 1
        tmp.replace(target)
        return n

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> FailureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error (the caller holds the lock)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
                return
            except sqlite3.Error:
                self._rollback()  # e.g. disk full at commit: leave no open transaction
                raise
        self._rollback()

    def _rollback(self) -> None:
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
