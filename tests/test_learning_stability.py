"""Training is stable on drafts that are already good (daemon/learning/stability.py).

Three good drafts of the toy domain's target: the target itself (acceptance 1.0), a deep
self-draft (three of its four layers) and a separate two-layer model distilled to agree with it.
With the daemon's defaults a run must never lower teacher-forced acceptance on its own training
cases, on the gate's held-out cases or on unseen prompts of the domain, and its loss must never
rise above the starting draft's after warm-up. With a learning rate far too large, the guards
(divergence stop, best checkpoint) must still hand back a draft no worse than the start.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from helpers.toycases import cases_from, domain_completions
from speclora.daemon import models
from speclora.daemon.learning import toy
from speclora.daemon.learning.adapters import AdapterStore
from speclora.daemon.learning.events import TrainParams, TrainProgress, TrainResult
from speclora.daemon.learning.session import run_training
from speclora.daemon.learning.stability import (
    LR_AT_GOOD,
    LR_AT_ZERO,
    Checkpoints,
    LossGuard,
    Score,
    auto_learning_rate,
)
from speclora.daemon.learning.store import FailureCase, FailureStore
from speclora.daemon.learning.trainer import is_heldout, measure_acceptance, prompt_key
from speclora.daemon.learning.trainer import warmup_steps as warmup_of
from speclora.daemon.state import ModelHub
from speclora.shared.config import Config, LearningConfig, LoraConfig

pytestmark = pytest.mark.slow
STEPS = 100
HELDOUT = LearningConfig().heldout_fraction


@pytest.fixture(scope="module")
def domain_target_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Same path as tests/test_learning.py uses, so one session trains the toy target once.
    return toy.write_domain_target(tmp_path_factory.getbasetemp() / "toy-domain-target")


@pytest.fixture(scope="module")
def distilled_path(domain_target_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toy.write_distilled_draft(
        tmp_path_factory.getbasetemp() / "toy-distilled-draft", domain_target_path
    )


@pytest.fixture(scope="module")
def completions(domain_target_path: Path) -> dict[str, list]:
    """The target's greedy outputs, once: 40 prompts to record, 24 unseen ones (other seed)."""
    target = models.load_model(str(domain_target_path))
    hub = ModelHub.from_loaded(target, None)
    return {"recorded": domain_completions(hub, 40), "unseen": domain_completions(hub, 24, 99)}


def good_hub(kind: str, target_path: Path, distilled: Path) -> ModelHub:
    target = models.load_model(str(target_path))
    if kind == "target":  # the target as its own (separate) draft
        return ModelHub.from_loaded(target, models.load_model(str(target_path)), str(target_path))
    if kind == "self:3":
        return ModelHub.from_loaded(target, models.make_self_draft(target, 3), "self:3")
    return ModelHub.from_loaded(target, models.load_model(str(distilled)), str(distilled))


def acceptance(hub: ModelHub, cases: list[FailureCase]) -> float:
    return measure_acceptance(hub.target, hub.draft, cases)


def train_on(
    hub: ModelHub, tmp_path: Path, config: Config, completions: dict[str, list]
) -> tuple[dict[str, float], dict[str, float], list[TrainProgress], TrainResult, dict]:
    """Record 40 domain cases, train with `config` (the adapter forced in, so it is the trained
    weights that are measured), and measure before and after on the training split, the gate's
    held-out split and 24 prompts of the domain the run never saw."""
    store = FailureStore(tmp_path / "f.sqlite3")
    adapters = AdapterStore(tmp_path / "adapters")
    cases = cases_from(hub, completions["recorded"])
    for case in cases:
        store.add(case)
    sides = {
        "train": [c for c in cases if not is_heldout(prompt_key(c.prompt_ids), HELDOUT)],
        "heldout": [c for c in cases if is_heldout(prompt_key(c.prompt_ids), HELDOUT)],
        "unseen": cases_from(hub, completions["unseen"]),
    }
    assert sides["train"] and sides["heldout"]
    before = {name: acceptance(hub, side) for name, side in sides.items()}
    events = list(run_training(hub, store, adapters, config, TrainParams(force_promote=True)))
    progress = [e for e in events if isinstance(e, TrainProgress)]
    result = events[-1]
    assert isinstance(result, TrainResult) and result.promoted
    assert hub.adapter_version == result.adapter_version
    after = {name: acceptance(hub, side) for name, side in sides.items()}
    metadata = adapters.verify(result.adapter_version).metadata
    store.close()
    return before, after, progress, result, metadata


@pytest.mark.parametrize("kind", ["target", "self:3", "distilled"])
def test_defaults_never_make_a_good_draft_worse(
    kind: str,
    domain_target_path: Path,
    distilled_path: Path,
    completions: dict[str, list],
    tmp_path: Path,
) -> None:
    hub = good_hub(kind, domain_target_path, distilled_path)
    config = Config(lora=LoraConfig(steps=STEPS))  # the daemon's defaults but the step count
    before, after, progress, result, meta = train_on(hub, tmp_path, config, completions)

    # These drafts start good. (The toy target is trained at test time and its weights differ
    # between machines in the last bits, so its self:3 starts at 0.88 on some and above 0.9 on
    # others; the same machine gives the same figure every run.)
    assert before["train"] >= 0.85, before
    if kind == "target":
        assert before == after == {"train": 1.0, "heldout": 1.0, "unseen": 1.0}
    for side in before:
        assert after[side] >= before[side] - 1e-9, (side, before, after)
    # A good start chooses a gentle rate (mlx-lm's 1e-5 at the top), not the 3e-4 that suits a
    # draft starting near zero.
    assert meta["learning_rate_source"] == "auto"
    assert meta["learning_rate"] <= 2e-5, meta["learning_rate"]
    assert meta["train_acceptance_start"] == pytest.approx(before["train"], abs=1e-6)
    assert not meta["stopped"] and len(progress) == STEPS
    # The loss never rises above the starting draft's on the same cases after warm-up, nor
    # (in its last steps) above its first value after warm-up.
    warmup = warmup_of(STEPS)
    late = progress[warmup:]
    for p in late:
        assert p.base_loss is not None and math.isfinite(p.loss)
        assert p.loss <= p.base_loss * 1.1 + 1e-3, (p.step, p.loss, p.base_loss)
    tail = [p.loss for p in progress[-10:]]
    assert sum(tail) / len(tail) <= late[0].loss + 1e-4, (late[0].loss, tail)


@pytest.mark.parametrize("kind", ["self:3", "distilled"])
def test_a_rate_far_too_large_stops_and_keeps_the_starting_draft(
    kind: str,
    domain_target_path: Path,
    distilled_path: Path,
    completions: dict[str, list],
    tmp_path: Path,
) -> None:
    """lr 1e-2 throws a good draft's loss from ~0.01 to several nats within a few steps: the
    run stops after warm-up and ends with the weights it started from."""
    hub = good_hub(kind, domain_target_path, distilled_path)
    config = Config(lora=LoraConfig(steps=STEPS, learning_rate=1e-2))
    before, after, progress, result, meta = train_on(hub, tmp_path, config, completions)
    assert meta["learning_rate_source"] == "config"
    assert meta["stopped"] and "above the starting draft" in meta["stopped"]
    # Three steps in a row above the start after warm-up stop it (one may overshoot).
    assert len(progress) == warmup_of(STEPS) + 3
    assert meta["best_step"] == 0 and "kept the weights of step 0" in result.reason
    for side in before:
        assert after[side] == pytest.approx(before[side], abs=1e-6), (side, before, after)


def test_learning_rate_follows_the_starting_acceptance() -> None:
    assert auto_learning_rate(0.0) == LR_AT_ZERO == auto_learning_rate(0.1)
    assert auto_learning_rate(0.95) == pytest.approx(LR_AT_GOOD)
    rates = [auto_learning_rate(a / 10) for a in range(11)]
    assert rates == sorted(rates, reverse=True)
    assert LR_AT_GOOD < auto_learning_rate(0.73) < 3e-5  # the 0.5B draft of the issue
    assert auto_learning_rate(float("nan")) == LR_AT_GOOD


def test_guard_and_checkpoints() -> None:
    guard = LossGuard({1: (0.5, 1.0, 1, 1), 2: (1.5, 1.0, 0, 1)}, warmup=2)
    assert guard.base_loss([1, 2]) == pytest.approx(1.0)
    assert not guard.diverged(1, 5.0, 1.0)  # warm-up may overshoot
    assert not guard.diverged(3, 1.05, 1.0)  # within the tolerance
    assert not guard.diverged(4, 1.2, 1.0)  # one step above may recover
    assert not guard.diverged(5, 0.5, 1.0)
    assert not guard.diverged(6, 1.2, 1.0) and not guard.diverged(7, 1.3, 1.0)
    assert guard.diverged(8, 1.2, 1.0) and "above the starting draft" in guard.reason
    assert guard.diverged(9, float("nan"), 1.0) and "not finite" in guard.reason

    marks = Checkpoints(0, Score(0.8, 0.1), {"w": 0})  # type: ignore[dict-item]
    assert not marks.offer(10, Score(0.7, 0.01), {"w": 1})  # type: ignore[dict-item]
    assert marks.offer(20, Score(0.8, 0.05), {"w": 2})  # type: ignore[dict-item]
    assert marks.offer(30, Score(0.9, 0.2), {"w": 3})  # type: ignore[dict-item]
    assert marks.best_step == 30 and marks.weights == {"w": 3}
