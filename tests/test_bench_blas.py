"""bench/blas.py (which BLAS is fastest at decode and verify widths): its smoke run ends to end
and reports, for every BLAS this machine has, a time at each width and the losslessness check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import blas as blas_bench  # noqa: E402


def test_ratios_are_paired_per_round() -> None:
    runs = {
        "openblas": [{"ms": {"1": 10.0, "5": 20.0}, "path": "o", "consistency": {}, "rss_mib": {}}]
        * 2,
        "mkl": [
            {"ms": {"1": 5.0, "5": 10.0}, "path": "m", "consistency": {}, "rss_mib": {}},
            {"ms": {"1": 10.0, "5": 30.0}, "path": "m", "consistency": {}, "rss_mib": {}},
        ],
    }
    summary = blas_bench.summarise(runs, (1, 5))
    assert list(summary["time_ratios"]) == ["mkl / openblas"]  # no pool variant ran
    assert summary["time_ratios"]["mkl / openblas"]["5"] == {"median": 1.0, "min": 0.5, "max": 1.5}
    assert summary["blas"]["mkl"]["cost_over_one_token"]["5"]["max"] == 3.0


@pytest.mark.slow
def test_smoke_run_reports_every_blas(tmp_path: Path) -> None:
    if not blas_bench.available_blas():
        pytest.skip("no BLAS library on this machine")
    out = tmp_path / "blas.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "blas.py"), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    for name, result in report["summary"]["blas"].items():
        assert set(result["ms"]) == {"1", "2", "5"}, name
        assert all(s["median"] > 0 for s in result["ms"].values())
        assert set(result["consistency"]) == {"2", "5"}
        # The children really ran the BLAS they were given, not whatever loaded first.
        assert report["runs"][name][0]["blas"] == name.split(",")[0]
    assert "| width |" in done.stdout
