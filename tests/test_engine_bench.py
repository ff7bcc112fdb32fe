"""The speculative benchmark's smoke mode runs end to end, so `make bench` cannot silently break."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "speculative.py"


@pytest.mark.slow
def test_bench_smoke_writes_table_and_json(tmp_path: Path):
    out = tmp_path / "speculative.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| T | draft | method |" in result.stdout
    data = json.loads(out.read_text())
    methods = {(r["temperature"], r["draft"], r["method"], r["k"]) for r in data["rows"]}
    for t in (0.0, 1.0):
        assert (t, "-", "target-only (mlx-lm)", "-") in methods
        for draft in ("untrained", "trained"):
            for method, k in [
                ("mlx-lm speculative", "4"),
                ("ours fast", "4"),
                ("ours detailed", "4"),
                ("ours detailed", "adaptive"),
            ]:
                assert (t, draft, method, k) in methods
    for row in data["rows"]:
        assert row["tokens"] > 0 and row["tokens_per_second"] > 0
        if row["temperature"] == 0.0:
            assert row["identical"] is True, row
    assert data["training"]["steps"] > 0
    assert set(data["costs"]) == {"untrained", "trained"}
