"""When the daemon may train by itself: idle long enough and enough new failure cases.

A pure function so the worker's loop stays simple and the rule is tested on its own. Cases
count as new until a training run has seen them (promoted or not), so a run whose adapter
was rejected is not retried until another `auto_train_min_new_cases` have gathered.
"""

from __future__ import annotations

from speclora.shared.config import LearningConfig


def should_auto_train(
    config: LearningConfig,
    *,
    idle_s: float,
    pending_cases: int,
    total_cases: int,
    training: bool,
    has_draft: bool = True,
) -> bool:
    """True when a background run should start now."""
    return (
        config.auto_train
        and has_draft
        and not training
        and idle_s >= config.auto_train_idle_s
        and pending_cases >= config.auto_train_min_new_cases
        and total_cases >= config.min_cases
    )
