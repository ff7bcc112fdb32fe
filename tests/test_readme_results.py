"""README's results table is the headline of the committed `make bench` report, not prose."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from headline import README_BEGIN, README_END, readme_block  # noqa: E402


def test_readme_results_table_matches_the_committed_bench_report() -> None:
    report = json.loads((REPO / "bench" / "results" / "latest.json").read_text())
    assert set(report["benchmarks"]) == {
        "speculative",
        "daemon",
        "learning",
        "workloads",
        "history",
    }
    readme = (REPO / "README.md").read_text()
    assert readme.count(README_BEGIN) == readme.count(README_END) == 1
    assert readme_block(report) in readme, "run: python bench/headline.py --readme README.md"


def test_committed_report_markdown_has_the_same_headline() -> None:
    from headline import headline_markdown

    report = json.loads((REPO / "bench" / "results" / "latest.json").read_text())
    markdown = (REPO / "bench" / "results" / "latest.md").read_text()
    assert headline_markdown(report["benchmarks"]) in markdown
