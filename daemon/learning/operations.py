"""What the RPCs ask of the learning loop: training runs, adapter versions, failure cases.

The servicer holds one `Learning` and speaks to it in domain terms (no protobuf here). Reads
of files and of the failure store run on the RPC thread (the store has its own lock, the
adapter directories are only read); anything that changes the serving draft runs in the
engine worker, which hands `hub` to `activate` and `rollback`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from speclora.daemon.errors import AdapterError, NotFoundError, PreconditionError
from speclora.daemon.learning.adapters import AdapterInfo, AdapterStore
from speclora.daemon.learning.events import TrainParams
from speclora.daemon.learning.history_recorder import History
from speclora.daemon.learning.session import run_training
from speclora.daemon.learning.store import FailureCase, FailureStore, StoreStats
from speclora.daemon.learning.swap import activate_version
from speclora.daemon.state import ModelHub
from speclora.daemon.worker import TaskFactory
from speclora.shared.config import Config


@dataclass(frozen=True)
class CheckedAdapter:
    """An adapter version and the result of checking its files against their checksums."""

    info: AdapterInfo
    integrity: str  # "ok", or what is wrong


@dataclass(frozen=True)
class PurgeResult:
    """What a purge of the user's recorded data deleted."""

    failure_cases: int
    history_requests: int = 0  # past requests the history drafter kept


class Learning:
    """The servicer's LearningLoop over the failure store, the adapter versions and the trainer."""

    def __init__(
        self,
        config: Config,
        store: FailureStore,
        adapters: AdapterStore,
        history: History | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.adapters = adapters
        self.history = history

    # -- training ---------------------------------------------------------------------

    def training_task(self, params: TrainParams) -> TaskFactory:
        # run_training checks its preconditions when the worker calls this, so a Train with
        # too few cases fails at once with FAILED_PRECONDITION.
        return lambda hub: run_training(hub, self.store, self.adapters, self.config, params)

    # -- adapters (activate and rollback run in the worker thread) -----------------------

    def activate(self, hub: ModelHub, version: str, *, force: bool = False) -> AdapterInfo | None:
        """Swap `version` ("none" = base draft) in; the gate's verdict holds unless `force`."""
        return activate_version(hub, self.adapters, version, force=force)

    def rollback(self, hub: ModelHub) -> AdapterInfo | None:
        return activate_version(hub, self.adapters, rollback=True)

    def list_adapters(self) -> list[AdapterInfo]:
        return self.adapters.list()

    @property
    def adapters_dir(self) -> Path:
        return self.adapters.root

    def get_adapter(self, version: str) -> CheckedAdapter:
        """One version ("" = the active one) with its files checked; a damaged version is
        shown with what is wrong rather than refused."""
        version = version or self.adapters.active_version()
        if not version:
            raise PreconditionError(
                "no adapter is active (the base draft serves); name a version "
                "(`speclora adapters list` shows them)"
            )
        try:
            return CheckedAdapter(self.adapters.verify(version), "ok")
        except NotFoundError:
            raise
        except AdapterError as exc:
            damaged = next((i for i in self.adapters.list() if i.version == version), None)
            if damaged is None:
                raise
            return CheckedAdapter(damaged, str(exc))

    # -- failure cases (the store is thread-safe) ----------------------------------------

    def failure_counts(self) -> tuple[int, int]:
        """(failure cases stored, cases recorded since the last training run)."""
        return self.store.count(), self.store.pending_count()

    def list_cases(self, limit: int, before_id: int | None = None) -> tuple[list[FailureCase], int]:
        """The newest `limit` cases (below `before_id`) and how many are stored in all."""
        return self.store.list(limit=limit, before_id=before_id), self.store.count()

    def get_case(self, case_id: int) -> FailureCase:
        case = self.store.get(case_id)
        if case is None:
            raise NotFoundError(
                f"no failure case {case_id}; `speclora failures list` shows the ids"
            )
        return case

    def iter_cases(self) -> Iterator[FailureCase]:
        """Every case, oldest first, read in batches."""
        return self.store.iter_all()

    def failure_stats(self) -> StoreStats:
        return self.store.stats()

    @property
    def database_path(self) -> Path:
        return self.store.path

    def purge(self) -> PurgeResult:
        """Delete every recorded prompt the daemon keeps, for good. The one place a purge
        happens: the history drafter's store holds the same prompts, so it goes too."""
        return PurgeResult(failure_cases=self.store.purge(), history_requests=self.purge_history())

    def purge_history(self) -> int:
        """The history drafter's stored past requests (every target's) and its index."""
        return self.history.purge() if self.history is not None else 0
