"""What the daemon holds while it runs: the model pair, the worker, the learning loop.

`build_runtime` loads everything `serve` needs before it listens; `Runtime.close` flushes and
closes it after the server has drained. The learning package plugs in here: its recorder sees
every summary, its training run is a worker task, adapter swaps run in the worker thread.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from speclora.daemon.errors import SpecLoRAError
from speclora.daemon.learning.adapters import AdapterStore
from speclora.daemon.learning.autotrain import should_auto_train
from speclora.daemon.learning.events import TrainParams, TrainResult
from speclora.daemon.learning.history_recorder import History
from speclora.daemon.learning.history_store import HistoryStore
from speclora.daemon.learning.operations import Learning
from speclora.daemon.learning.recorder import FailureRecorder
from speclora.daemon.learning.store import FailureStore, StoreError
from speclora.daemon.learning.swap import load_active_adapter
from speclora.daemon.state import ModelHub
from speclora.daemon.stats import TRAINING_TASK
from speclora.daemon.worker import Worker
from speclora.shared.config import Config
from speclora.shared.paths import Paths, ensure_private_dir

log = structlog.get_logger(__name__)

AUTO_TRAIN_CHECK_S = 5.0


def _stderr_progress() -> Callable[[int, int, str], None]:
    """Model download/convert progress on stderr: a bar on a terminal, a line per 10% else."""
    last = [-1]

    def report(done: int, total: int, what: str) -> None:
        pct = int(100 * done / total) if total else 100
        if sys.stderr.isatty():
            sys.stderr.write(f"\r{what[:40]:40s} {pct:3d}%")
            if done >= total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif pct // 10 != last[0] // 10:
            log.info("model_progress", what=what, percent=pct)
        last[0] = pct

    return report


def convert_in_child(spec: str | None) -> None:
    """Convert a GGUF (or the embedded model) in a child process if it is not cached yet.

    Conversion holds every tensor in f32 at once (~1.7x the weights); done in the daemon, that
    high-water mark would stay in its RSS for weeks. `speclora models pull` in a child process
    does the same work and returns all of it to the OS when it exits."""
    from speclora.daemon import gguf
    from speclora.daemon.models import default_models_dir, parse_self_draft, resolve_model_source

    if not spec or spec.lower() in ("none", "off") or parse_self_draft(spec) is not None:
        return
    source = resolve_model_source(spec)
    if source.kind not in ("gguf", "embedded"):
        return
    if (
        source.path is not None
        and (gguf.cache_dir_for(source.path, default_models_dir()) / "config.json").exists()
    ):
        return
    log.info("model_convert_started", model=spec, isolated=True)
    result = subprocess.run(
        [sys.executable, "-m", "speclora", "models", "pull", spec],
        stdin=subprocess.DEVNULL,
        stdout=sys.stderr,  # its progress belongs in the daemon's log
        check=False,
    )
    if result.returncode != 0:
        # The in-process path below will raise the real, explained error.
        log.warning("model_convert_child_failed", model=spec, status=result.returncode)


def build_hub(config: Config) -> ModelHub:
    """Load the configured model pair (downloading or converting on first use)."""
    from speclora.daemon.memory import limit_buffer_cache, release_free_memory
    from speclora.daemon.models import load_pair

    m = config.models
    limit_buffer_cache(m.buffer_cache_mb)
    for spec in (m.target, m.draft):
        convert_in_child(spec)
    target, draft = load_pair(m.target, m.draft, m.dtype, progress=_stderr_progress())
    extras: dict[str, Any] = {}
    from speclora.daemon.engine import DraftVocab, measure_prices

    spec = config.speculation
    if draft is not None:
        size = spec.draft_vocab_size
        if 0 < size < target.vocab_size:  # a head as wide as the vocabulary saves nothing
            extras["draft_vocab"] = DraftVocab(
                vocab_size=target.vocab_size,
                size=size,
                always=tuple(getattr(target.tokenizer, "eos_token_ids", ()) or ()),
            )
    # The controller needs each step's price in target passes on this machine: verify passes
    # as wide as the longest proposal, and a draft pass with the head generation will use.
    extras["prices"] = measure_prices(
        target.model,
        draft.model if draft is not None else None,
        max_k=spec.adaptive_max,
        max_verify=max(spec.adaptive_max, config.history.max_proposal),
        draft_vocab=extras.get("draft_vocab"),
    )
    if "draft_vocab" in extras:
        from speclora.daemon.engine.costs import with_draft_head
        from speclora.daemon.engine.draft_vocab import HeadChoice

        # Whether the restricted head pays is the pair's property: measure both heads' prices
        # here, and let what the target writes decide (HeadChoice).
        extras["head_choice"] = HeadChoice(
            restricted_prices=extras["prices"],
            full_prices=with_draft_head(extras["prices"], target.model, draft.model, None),
            max_k=spec.adaptive_max,
        )
    log.info(
        "step_prices_measured",
        draft=draft.name if draft is not None else "none",
        verify=extras["prices"].verify[: spec.adaptive_max + 1],
        draft_pass=extras["prices"].draft,
        full_head_draft_pass=(
            extras["head_choice"].full_prices.draft if "head_choice" in extras else None
        ),
        draft_vocab=spec.draft_vocab_size if "draft_vocab" in extras else "full",
    )
    from speclora.daemon.engine import PromptCache

    prompt_cache = PromptCache(spec.prompt_cache_entries, spec.prompt_cache_mb << 20)
    hub = ModelHub.from_loaded(target, draft, m.draft, extras=extras, prompt_cache=prompt_cache)
    # Loading frees what it parsed and cast (tokenizer.json's JSON tree alone is ~15 MiB on a
    # 49k vocabulary) into glibc's heap, where it would stay resident: hand it back now.
    release_free_memory()
    return hub


class AutoTrainer:
    """Starts a training run when the daemon has been idle long enough with enough new cases
    (learning.auto_train); the run itself is an ordinary worker task."""

    def __init__(self, worker: Worker, learning: Learning, check_s: float | None = None):
        self._worker = worker
        self._learning = learning
        # Often enough that a run starts within a few percent of the idle time it waits for.
        idle = learning.config.learning.auto_train_idle_s
        self._check_s = check_s or min(AUTO_TRAIN_CHECK_S, max(0.2, idle / 10))
        self._stop = threading.Event()
        self._job: Any = None
        # Pending cases when a run was last refused (too few usable cases to split, ...):
        # the same cases are not retried, and logged, every few seconds.
        self._refused_at: int | None = None
        self._thread = threading.Thread(target=self._run, name="auto-train", daemon=True)

    def start(self) -> AutoTrainer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._job is not None:
            self._job.cancel()
        self._thread.join(5)

    def _due(self) -> bool:
        store = self._learning.store
        if self._refused_at is not None and store.pending_count() == self._refused_at:
            return False
        return should_auto_train(
            self._learning.config.learning,
            idle_s=self._worker.idle_seconds,
            pending_cases=store.pending_count(),
            total_cases=store.count(),
            training=self._worker.task_state(TRAINING_TASK) == "running",
            has_draft=self._worker.hub.draft is not None,
        )

    def _run(self) -> None:
        while not self._stop.wait(self._check_s):
            try:
                if not self._due():
                    continue
                store = self._learning.store
                log.info(
                    "auto_train_starting",
                    idle_s=round(self._worker.idle_seconds, 1),
                    pending_cases=store.pending_count(),
                    cases=store.count(),
                )
                self._job = self._worker.submit_task(
                    TRAINING_TASK,
                    self._learning.training_task(TrainParams(trigger="auto")),
                    trigger="auto",
                )
                for event in self._job:
                    if isinstance(event, TrainResult):
                        log.info(
                            "auto_train_finished",
                            version=event.adapter_version,
                            promoted=event.promoted,
                            before=round(event.acceptance_before, 4),
                            after=round(event.acceptance_after, 4),
                            duration_s=round(event.duration_s, 1),
                            reason=event.reason,
                        )
            except SpecLoRAError as exc:  # busy, shutting down, too few cases: try later
                log.info("auto_train_skipped", reason=str(exc))
                try:
                    self._refused_at = self._learning.store.pending_count()
                except Exception:
                    self._refused_at = None
            except Exception:
                log.exception("auto_train_failed")
            finally:
                self._job = None


@dataclass
class Runtime:
    """Everything `serve` builds before it listens, and closes after it stops."""

    worker: Worker
    learning: Learning | None = None
    closers: list[Callable[[], Any]] = field(default_factory=list)

    def close(self) -> None:
        self.worker.stop()
        for close in self.closers:  # in order: auto-trainer, then flush and close the store
            try:
                close()
            except Exception:
                log.exception("close_failed", what=getattr(close, "__qualname__", repr(close)))


def open_history(config: Config, paths: Paths, target_id: str) -> History | None:
    """The target's history, loaded from the data dir (None when `history.enabled` is off).

    A history file that cannot be opened does not stop the daemon: it runs with a history
    in memory only, and says so."""
    h = config.history
    if not h.enabled:
        return None
    store = None
    if h.persist:
        try:
            store = HistoryStore(paths.history_database, max_tokens=h.max_tokens)
        except StoreError as exc:
            log.error(
                "history_store_unavailable",
                error=str(exc),
                hint="move the file away or `speclora history purge`; running without it",
            )
    history = History(h, target_id, store)
    history.load()
    return history


def build_runtime(config: Config, paths: Paths) -> Runtime:
    hub = build_hub(config)
    ensure_private_dir(paths.data_dir)
    # A damaged database does not stop the daemon: generation serves, and every call that
    # needs the cases says what is wrong with the file and how to fix it.
    store = FailureStore(paths.database, cap=config.learning.buffer_cap)
    adapters = AdapterStore(paths.adapters_dir)
    recorder = FailureRecorder(store, config.learning)
    hub.history = open_history(config, paths, hub.target_id)
    worker = Worker(hub, config, recorder=recorder).start()
    learning = Learning(config, store, adapters, hub.history)
    runtime = Runtime(worker, learning)
    if hub.draft is not None:
        version = worker.call("load_adapter", lambda h: load_active_adapter(h, adapters))
        log.info("adapter_loaded", version=version or "none")
    if config.learning.auto_train:
        runtime.closers.append(AutoTrainer(worker, learning).start().stop)
    runtime.closers += [recorder.close, store.close]
    if hub.history is not None:  # commit what is queued, then close the file
        runtime.closers.append(hub.history.close)
        if hub.history.store is not None:
            runtime.closers.append(hub.history.store.close)
    return runtime
