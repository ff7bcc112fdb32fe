"""Domain events of a training run, mirroring the proto's TrainEvent (no gRPC, no MLX).

`run_training` yields these; the servicer converts all but `TrainTick` to protobuf. A tick
marks a bounded slice of work (a batch of teacher logits or of evaluation) so the worker can
run a generation step between slices; it carries no news for the client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class TrainParams:
    """One run's knobs; None takes the daemon's configuration (TrainRequest maps onto this)."""

    steps: int | None = None
    max_cases: int | None = None
    learning_rate: float | None = None
    force_promote: bool = False
    # Seconds the whole run may take (the final evaluation included); None = learning.max_train_s,
    # 0 = no limit.
    max_train_s: float | None = None
    seed: int = 0
    # Ablations: 1.0 is plain uniform KL; shuffled teachers train a deliberately worse draft.
    rejected_weight: float | None = None
    shuffle_teacher: bool = False
    trigger: str = "manual"  # "auto": the daemon started the run by itself (learning.auto_train)


@dataclass(frozen=True)
class TrainStarted:
    train_cases: int
    heldout_cases: int
    steps: int
    parent_version: str  # "" = the base draft


@dataclass(frozen=True)
class TrainProgress:
    step: int  # 1-based
    total_steps: int
    loss: float  # weighted KL(target || draft) of this step's batch
    tokens_per_second: float
    # The starting draft's loss on the same batch: a batch's loss above it means training made
    # the draft worse there (the divergence stop compares the two, learning/stability.py).
    base_loss: float | None = None


@dataclass(frozen=True)
class TrainEvaluation:
    phase: Literal["before", "after"]
    heldout_acceptance: float


@dataclass(frozen=True)
class TrainResult:
    adapter_version: str
    promoted: bool
    reason: str
    acceptance_before: float
    acceptance_after: float
    duration_s: float
    trigger: str = "manual"  # "auto" | "manual", from TrainParams

    @property
    def outcome(self) -> str:
        """How the run ended, as the worker counts task runs: the gate promoted it or not."""
        return "promoted" if self.promoted else "rejected"


@dataclass(frozen=True)
class TrainTick:
    """Internal slice boundary (not sent to clients): `phase` is "teacher", "evaluate" or
    "checkpoint" (scoring the training cases)."""

    phase: str
    done: int
    total: int


TrainEvent = TrainStarted | TrainProgress | TrainEvaluation | TrainResult | TrainTick
