"""One training run as a generator the engine worker advances a slice at a time.

`run_training` checks its preconditions at once (so the Train RPC fails fast with a clear
message) and returns a generator. Each `next()` does one bounded slice: a batch of teacher
logits, a batch of held-out evaluation, or one optimizer step; the worker runs generation
steps in between, so serving continues during training. Training happens on a clone of the
draft; the serving draft changes only at the very end, when a promoted adapter is swapped in.
Closing the generator early (cancel, shutdown) leaves no trace: nothing is written.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import mlx.core as mx
import numpy as np
import structlog
from speclora.daemon.engine.draft_vocab import DraftVocab
from speclora.daemon.errors import AdapterError, PreconditionError
from speclora.daemon.learning import lora
from speclora.daemon.learning.adapters import PROMOTED, REJECTED, AdapterStore
from speclora.daemon.learning.events import (
    TrainEvaluation,
    TrainEvent,
    TrainParams,
    TrainProgress,
    TrainResult,
    TrainStarted,
    TrainTick,
)
from speclora.daemon.learning.stability import (
    Checkpoints,
    LossGuard,
    auto_learning_rate,
    checkpoint_every,
    total_score,
)
from speclora.daemon.learning.store import FailureStore
from speclora.daemon.learning.swap import (
    BASE_NORM_KEY,
    apply_adapter,
    is_self_draft,
    save_adapter,
    swap_count,
)
from speclora.daemon.learning.trainer import (
    DraftTrainer,
    Example,
    LossPositionLogits,
    TeacherRows,
    expected_acceptance,
    learning_rate_at,
    prepare_examples,
    shuffle_teacher,
    split_examples,
    teacher_rows,
    token_batches,
    vocab_size,
    warmup_steps,
)
from speclora.daemon.state import ModelHub
from speclora.shared.config import Config

log = structlog.get_logger(__name__)

# Padded tokens per teacher/evaluation slice: bounds how long generation waits on training.
SLICE_TOKENS = 2048


def run_training(
    hub: ModelHub,
    store: FailureStore,
    adapters: AdapterStore,
    config: Config,
    params: TrainParams | None = None,
) -> Iterator[TrainEvent]:
    """Validate, then return the run's event generator. Worker thread only.

    Raises PreconditionError when there is no draft or too few cases to train on.
    """
    params = params or TrainParams()
    learning = config.learning
    if hub.draft is None:
        raise PreconditionError(
            "there is no draft model to train (models.draft is 'none'); configure a draft"
        )
    cases = store.recent(params.max_cases)
    if len(cases) < learning.min_cases:
        raise PreconditionError(
            f"training needs at least {learning.min_cases} failure cases and the store has "
            f"{len(cases)}; generate more with recording on (learning.record) and retry"
        )
    weight = learning.rejected_weight if params.rejected_weight is None else params.rejected_weight
    examples = prepare_examples(cases, config.lora.max_seq_len, weight)
    train, heldout = split_examples(examples, learning.heldout_fraction)
    if not train or not heldout:
        raise PreconditionError(
            f"{len(examples)} usable cases cannot be split into train and held-out sets; "
            "record more cases"
        )
    through_id = max(int(c.id or 0) for c in cases)
    return _run(hub, store, adapters, config, params, train, heldout, through_id, weight)


def _run(
    hub: ModelHub,
    store: FailureStore,
    adapters: AdapterStore,
    config: Config,
    params: TrainParams,
    train: list[Example],
    heldout: list[Example],
    through_id: int,
    rejected_weight: float,
) -> Iterator[TrainEvent]:
    start = time.monotonic()
    learning, lora_cfg = config.learning, config.lora
    steps = params.steps or lora_cfg.steps
    parent = hub.adapter_version
    swaps_at_start = swap_count(hub)  # a change by hand while we train wins over our promotion
    self_draft = is_self_draft(hub)
    log.info(
        "training_started",
        trigger=params.trigger,
        train_cases=len(train),
        heldout_cases=len(heldout),
        steps=steps,
        parent=parent or "none",
    )
    yield TrainStarted(len(train), len(heldout), steps, parent)

    vocab = vocab_size(hub.target, hub.draft)
    # The draft trains and is judged with the head it serves with (None = the full vocabulary).
    ids = training_vocabulary(hub.extras.get("draft_vocab"), train)
    target = LossPositionLogits(hub.target)
    teacher_target = target if ids is None else LossPositionLogits(hub.target, ids)
    served = LossPositionLogits(hub.draft, ids)
    if ids is not None and (served.ids is None or teacher_target.ids is None):
        # A head that cannot be restricted on either side: both use the full vocabulary, so
        # the teacher's columns always mean what the student's mean.
        ids, teacher_target, served = None, target, LossPositionLogits(hub.draft)

    # Held-out acceptance of the draft that serves now: the bar a new adapter must clear.
    before = yield from _evaluate(target, served, heldout, vocab)
    yield TrainEvaluation("before", before)
    # The final evaluation costs what this one did; the time budget must leave room for it.
    evaluation_s = time.monotonic() - start

    # Teacher distributions, once per training case, kept in memory for the whole run.
    teacher: dict[int, TeacherRows] = {}
    batches = token_batches(train, SLICE_TOKENS)
    for n, batch in enumerate(batches, 1):
        rows = teacher_rows(teacher_target, batch, learning.teacher_top_k, vocab)
        teacher.update((id(e), r) for e, r in zip(batch, rows, strict=True))
        yield TrainTick("teacher", n, len(batches))
    if params.shuffle_teacher:
        shuffled = shuffle_teacher([teacher[id(e)] for e in train], params.seed)
        teacher = {id(e): rows for e, rows in zip(train, shuffled, strict=True)}

    adapter_config = lora.adapter_config(
        lora.resolve_num_layers(hub.draft, lora_cfg.layers),
        lora_cfg.rank,
        lora_cfg.scale,
        lora_cfg.dropout,
    )
    trainer = DraftTrainer(
        hub.draft,
        adapter_config,
        train_norm=self_draft,
        vocab=vocab,
        seed=params.seed,
        ids=ids,
    )
    if lora.current_config(hub.draft) != adapter_config:
        parent = ""  # LoRA shape changed since the active adapter: train from the base draft
        base_norm = hub.extras.get(BASE_NORM_KEY)
        if self_draft and base_norm:
            trainer.model.load_weights(list(base_norm.items()), strict=False)

    # Step 0: the draft as it starts, on its own training cases (one draft pass, the target's
    # side is cached). It sets the learning rate, the divergence baseline and checkpoint 0.
    score_start = time.monotonic()
    base_scores = yield from _score(trainer, batches, teacher)
    score_s = time.monotonic() - score_start
    start_score = total_score(base_scores)
    if params.learning_rate:
        lr, lr_source = params.learning_rate, "request"
    elif lora_cfg.learning_rate:
        lr, lr_source = lora_cfg.learning_rate, "config"
    else:
        lr, lr_source = auto_learning_rate(start_score.acceptance), "auto"
    log.info(
        "training_learning_rate_chosen",
        learning_rate=lr,
        source=lr_source,
        train_acceptance=round(start_score.acceptance, 4),
        train_loss=round(start_score.loss, 4),
    )
    warmup = warmup_steps(steps)
    guard = LossGuard(base_scores, warmup)
    checkpoints = Checkpoints(0, start_score, trainer.snapshot())
    every = checkpoint_every(steps)

    rng = np.random.default_rng(params.seed)
    order: list[Example] = []
    loss = float("nan")
    done = 0
    scored_at = 0
    stopped = ""
    budget = learning.max_train_s if params.max_train_s is None else params.max_train_s
    out_of_time = False
    steps_start = time.monotonic()
    horizon = steps
    for step in range(1, steps + 1):
        now = time.monotonic()
        per_step = (now - steps_start) / done if done else 0.0
        # Whole run within the budget: this step, a last checkpoint score and the final
        # evaluation must still fit.
        left = budget - (now - start) - evaluation_s - score_s
        if budget and left < per_step:
            log.info("training_time_budget_reached", steps_done=done, budget_s=budget)
            out_of_time = True
            break
        if budget and done >= 3:  # decay the learning rate by when the budget will stop us
            horizon = min(steps, done + int(left / per_step))
        if len(order) < lora_cfg.batch_size:
            order.extend(train[i] for i in rng.permutation(len(train)))
        batch, order = order[: lora_cfg.batch_size], order[lora_cfg.batch_size :]
        t0 = time.perf_counter()
        rate_lr = learning_rate_at(step, horizon, lr, warmup)
        loss, tokens = trainer.step(batch, [teacher[id(e)] for e in batch], rate_lr)
        done = step
        rate = tokens / max(time.perf_counter() - t0, 1e-9)
        base_loss = guard.base_loss([id(e) for e in batch])
        yield TrainProgress(step, steps, loss, rate, base_loss)
        if guard.diverged(step, loss, base_loss):
            stopped = guard.reason
            log.warning("training_diverged", step=step, reason=stopped)
            break
        if step % every == 0 and step < steps:
            scores = yield from _score(trainer, batches, teacher)
            checkpoints.offer(step, total_score(scores), trainer.snapshot())
            scored_at = step

    if not stopped and done > scored_at:  # the last weights are a candidate too
        scores = yield from _score(trainer, batches, teacher)
        checkpoints.offer(done, total_score(scores), trainer.snapshot())
        scored_at = done
    if checkpoints.best_step != done:
        # A diverged run's last weights are suspect whatever they scored; otherwise an earlier
        # checkpoint (step 0, the starting draft, included) did better on the training cases.
        trainer.restore(checkpoints.weights)
        log.info(
            "training_checkpoint_restored",
            step=checkpoints.best_step,
            steps_done=done,
            train_acceptance=round(checkpoints.best.acceptance, 4),
            train_acceptance_start=round(start_score.acceptance, 4),
        )

    model = trainer.finish()
    after = yield from _evaluate(target, LossPositionLogits(model, ids), heldout, vocab)
    yield TrainEvaluation("after", after)

    margin = learning.promotion_margin
    if after >= before + margin:
        promoted = True
        reason = f"held-out acceptance rose {before:.3f} -> {after:.3f} (margin {margin:.3f})"
    elif params.force_promote:
        promoted = True
        reason = f"forced: held-out acceptance {before:.3f} -> {after:.3f} (margin {margin:.3f})"
    else:
        promoted = False
        reason = (
            f"held-out acceptance {before:.3f} -> {after:.3f} did not rise by the margin "
            f"{margin:.3f}; kept for inspection, not used"
        )
    if stopped:
        reason = f"{reason}; training stopped early: {stopped}"
    elif out_of_time:
        reason = f"{reason}; the time budget ({budget:g} s) ended it after {done} of {steps} steps"
    if checkpoints.best_step != done:
        reason = f"{reason}; kept the weights of step {checkpoints.best_step} of {done}"
    metadata = {
        "parent": parent,
        "status": PROMOTED if promoted else REJECTED,
        "reason": reason,
        "acceptance_before": before,
        "acceptance_after": after,
        "train_cases": len(train),
        "heldout_cases": len(heldout),
        "case_id_range": [min(e.case_id for e in train + heldout), through_id],
        "steps": done,
        "final_loss": loss,
        "learning_rate": lr,
        "learning_rate_source": lr_source,
        "train_acceptance_start": start_score.acceptance,
        "train_acceptance_best": checkpoints.best.acceptance,
        "best_step": checkpoints.best_step,
        "stopped": stopped,
        "max_train_s": budget,
        "out_of_time": out_of_time,
        "rejected_weight": rejected_weight,
        "teacher_top_k": learning.teacher_top_k,
        "shuffle_teacher": params.shuffle_teacher,
        "target_id": hub.target_name,
        "draft_id": hub.draft_name,
        "draft_spec": hub.draft_spec,
        "duration_s": time.monotonic() - start,
        "trigger": params.trigger,
    }
    info = save_adapter(adapters, model, adapter_config, metadata, with_norm=self_draft)
    if promoted and swap_count(hub) != swaps_at_start:
        # Someone activated or rolled back while this run trained: keep their choice. The
        # version passed the gate, so `adapters activate` takes it without --force.
        promoted = False
        serving = hub.adapter_version or "none"
        reason = (
            f"{reason}; not swapped in: adapter {serving} was activated while this run trained "
            f"(use it with `speclora adapters activate {info.version}`)"
        )
        log.info("training_promotion_skipped", version=info.version, serving=serving)
    elif promoted:
        try:
            apply_adapter(hub, adapters, info.version)
            adapters.activate(info.version, force=True)
        except AdapterError as exc:  # should not happen: we just wrote it
            promoted = False
            reason = f"could not swap in the new adapter: {exc}"
            adapters.set_status(info.version, REJECTED, reason)
            log.exception("adapter_swap_failed", version=info.version)
    store.mark_trained(through_id)
    duration = time.monotonic() - start
    log.info(
        "training_finished",
        trigger=params.trigger,
        version=info.version,
        promoted=promoted,
        before=round(before, 4),
        after=round(after, 4),
        steps=done,
        duration_s=round(duration, 1),
    )
    yield TrainResult(info.version, promoted, reason, before, after, duration, params.trigger)


def training_vocabulary(
    draft_vocab: DraftVocab | None, train: Sequence[Example]
) -> mx.array | None:
    """The token ids the draft's head scores while training: the served draft vocabulary plus
    every token of the training cases (serving adds a prompt's own tokens per request, and the
    worker counts what the target generated, so these are in or near the set already).
    None when the draft serves with its full head."""
    if draft_vocab is None:
        return None
    seen = np.fromiter((t for e in train for t in e.tokens), dtype=np.int64)
    seen = seen[(seen >= 0) & (seen < draft_vocab.vocab_size)]
    ids = np.union1d(np.array(draft_vocab.ids()), seen).astype(np.int32)
    return mx.array(ids)


def _score(
    trainer: DraftTrainer, batches: Sequence[Sequence[Example]], teacher: dict[int, TeacherRows]
) -> Iterator[TrainTick]:
    """DraftTrainer.score over every training case, one slice per batch; keyed by id(example)."""
    out: dict[int, tuple[float, float, int, int]] = {}
    for n, batch in enumerate(batches, 1):
        scores = trainer.score(batch, [teacher[id(e)] for e in batch])
        out.update((id(e), sc) for e, sc in zip(batch, scores, strict=True))
        yield TrainTick("checkpoint", n, len(batches))
    return out


def _evaluate(
    target: LossPositionLogits,
    draft: LossPositionLogits,
    examples: Sequence[Example],
    vocab: int,
) -> Iterator[TrainTick]:
    """Mean expected acceptance over held-out positions, one slice per batch."""
    total, count = 0.0, 0
    batches = token_batches(examples, SLICE_TOKENS)
    for n, batch in enumerate(batches, 1):
        s, c = expected_acceptance(target, draft, batch, vocab)
        total, count = total + s, count + c
        yield TrainTick("evaluate", n, len(batches))
    return total / count if count else 0.0
