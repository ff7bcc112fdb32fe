"""bench/draft_levers.py (issue #20's levers, offline): its smoke run ends to end, and every lever
starts as the draft itself, so a trained lever's figure is the lever's and nothing else's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import draft_levers  # noqa: E402


@pytest.mark.parametrize("kind", draft_levers.LEVERS)
def test_an_untrained_lever_is_the_draft_exactly(kind: str) -> None:
    h, f = mx.random.normal((5, 16)), mx.random.normal((5, 16))
    lever = draft_levers.Lever(kind, 16, width=8)
    assert mx.array_equal(lever(h, f), h).item()


def test_features_split_by_case_and_join() -> None:
    data = object.__new__(draft_levers.Features)
    data.ends = [4, 4, 6]  # three cases: 4 positions, none (too short), 2
    for i, name in enumerate(draft_levers.Features.FIELDS):
        setattr(data, name, mx.arange(6) + 10 * i)
    head = data.first_cases(2)
    assert len(head) == 4 and head.f2.tolist() == [20, 21, 22, 23] and head.ends == [4, 4]
    both = head.plus(data)
    assert len(both) == 10 and both.ends == [4, 4, 8, 8, 10]


@pytest.mark.slow
def test_smoke_run_reports_every_lever(tmp_path: Path) -> None:
    out = tmp_path / "levers.json"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "draft_levers.py"),
            "--smoke",
            "--samples",
            "1",
            "--json",
            str(out),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    kinds = [r["kind"] for r in data["rows"]]
    assert kinds[: len(draft_levers.LEVERS)] == list(draft_levers.LEVERS)
    assert kinds.count("hidden map") == 4  # all data, a quarter, a half, + samples
    for row in data["rows"]:
        for name in ("train", "heldout", "unrelated"):
            assert 0.0 <= row[name] <= 1.0
    sampled = data["rows"][-1]
    assert sampled["train_positions"] > data["rows"][1]["train_positions"]
    assert "| hidden map |" in result.stdout
