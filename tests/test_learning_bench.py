"""bench/learning.py --smoke: the whole scripted learning session on toy models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_learning_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "learning.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "learning.py"), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| held-out acceptance, teacher-forced per token |" in proc.stdout
    report = json.loads(out.read_text())
    heldout = report["heldout"]
    assert heldout["identical_to_target_greedy"]
    assert report["recording"]["cases"] == report["prompts"]["train"]
    assert (
        heldout["teacher_forced_acceptance_after"]
        > heldout["teacher_forced_acceptance_before"] + 0.3
    )
    assert heldout["teacher_forced_base_recheck"] == pytest.approx(
        heldout["teacher_forced_acceptance_before"], abs=1e-6
    )
