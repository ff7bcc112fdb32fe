"""`make bench` in smoke mode (tiny models, seconds): every benchmark runs end to end and the
report, with its headline table, is written, so `make bench` cannot silently break."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def _clean_env() -> dict[str, str]:
    """The environment without SPECLORA_* settings, so the benches use their own homes."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SPECLORA_")}


def _write_report(directory: Path, data: dict[str, Any], markdown: str) -> None:
    (directory / "latest.json").write_text(json.dumps(data))
    (directory / "latest.md").write_text(markdown)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench-results")
    scratch = tmp_path_factory.mktemp("bench-tmp")  # the benches' TMPDIR: must end up empty
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run_all.py"), "--smoke", "--out", str(out)],
        env={**_clean_env(), "TMPDIR": str(scratch)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    # MLX keeps its compiled-kernel cache in TMPDIR/mlx on purpose; nothing else may stay.
    left = [p.name for p in scratch.iterdir() if p.name != "mlx"]
    assert not left, f"a benchmark left temporary files behind: {left}"
    return json.loads((out / "latest.json").read_text()), (out / "latest.md").read_text()


@pytest.mark.slow
def test_every_benchmark_ran_on_the_fast_blas(report: tuple[dict[str, Any], str]) -> None:
    """A bench that imports mlx before speclora.daemon.blas runs on the reference BLAS, several
    times slower, and every number it prints is wrong; this once happened unnoticed."""
    from speclora.daemon.blas import blas_info

    expected = blas_info().name  # conftest preloads it the right way
    benches = report[0]["benchmarks"]
    found = {name: b["blas"] for name, b in benches.items()}
    found["daemon (server process)"] = benches["daemon"]["daemon_blas"]
    assert all(name == expected for name in found.values()), (expected, found)


@pytest.mark.slow
def test_speculative_bench(report: tuple[dict[str, Any], str]) -> None:
    data = report[0]["benchmarks"]["speculative"]
    methods = {(r["temperature"], r["draft"], r["method"], r["k"]) for r in data["rows"]}
    for t in (0.0, 1.0):
        for draft in ("untrained", "trained"):
            for method, k in [
                ("target-only (mlx-lm)", "-"),
                ("mlx-lm speculative", "4"),
                ("ours fast", "4"),
                ("ours detailed", "4"),
                ("ours detailed", "adaptive"),
            ]:
                assert (t, draft, method, k) in methods
    for row in data["rows"]:
        assert row["tokens"] > 0 and row["tokens_per_second"] > 0
        assert row["speedup"] is not None  # against its own block's target-only baseline
        if row["temperature"] == 0.0:
            assert row["identical"] is True, row
    assert data["training"]["steps"] > 0
    assert set(data["costs"]) == {"untrained", "trained"}
    # Each rule's expected acceptance on the T = 1 target-only text; min(p, q) >= p q pointwise.
    for draft in ("untrained", "trained"):
        e = data["expected_acceptance"][draft]
        assert e["temperature"] == 1.0 and e["positions"] > 0
        assert 0.0 < e["mlx_lm"] <= e["ours"] <= 1.0


@pytest.mark.slow
def test_daemon_bench(report: tuple[dict[str, Any], str]) -> None:
    data = report[0]["benchmarks"]["daemon"]
    for key in ("in_process_tokens_per_s", "daemon_tokens_per_s", "concurrent_vs_single"):
        assert data[key] > 0
    assert data["clients"] == [4] and len(data["per_client_tokens_per_s"]) == 4
    assert data["concurrent"]["4"]["vs_single"] > 0
    assert data["unbatched"]["batched_single_over_unbatched_single"] > 0
    assert data["unbatched"]["batched_4_over_unbatched_4_clients"] > 0
    assert data["http_concurrent"]["clients"] == 4 and data["http_concurrent"]["vs_single_grpc"] > 0
    assert data["fairness_max_over_min"] >= 1.0
    assert data["memory"]["peak_rss_bytes"] >= data["memory"]["rss_bytes"] > 0


@pytest.mark.slow
def test_learning_bench(report: tuple[dict[str, Any], str]) -> None:
    data = report[0]["benchmarks"]["learning"]
    heldout = data["heldout"]
    assert heldout["identical_to_target_greedy"]
    assert data["recording"]["cases"] == data["prompts"]["train"]
    assert (
        heldout["teacher_forced_acceptance_after"]
        > heldout["teacher_forced_acceptance_before"] + 0.3
    )
    assert heldout["teacher_forced_base_recheck"] == pytest.approx(
        heldout["teacher_forced_acceptance_before"], abs=1e-6
    )


@pytest.mark.slow
def test_workloads_bench(report: tuple[dict[str, Any], str]) -> None:
    """Six workloads, six methods each, every output the target's; the history drafter had a
    history to draft from where the workload gives it one."""
    data = report[0]["benchmarks"]["workloads"]
    assert set(data["workloads"]) == set("abcdef")
    rows = data["rows"]
    assert len(rows) == 36 and all(r["identical"] for r in rows)
    by = {(r["workload"], r["method"]): r for r in rows}
    assert by[("d", "ours hybrid")]["history_tokens"] > 0  # 20 earlier requests
    assert by[("f", "ours hybrid")]["history_tokens"] == 0  # empty history
    assert all(r["speedup"] > 0 for r in rows)


@pytest.mark.slow
def test_history_bench(report: tuple[dict[str, Any], str]) -> None:
    """The history drafter's cost bench filled its index to the bound and timed every call."""
    data = report[0]["benchmarks"]["history"]
    assert data["within_bound"] and data["history_tokens"] > 0.9 * data["bound_tokens"]
    ops = {r["operation"]: r for r in data["rows"]}
    assert ops["propose (history), copied span"]["calls"] > 0
    assert all(r["median_ms"] > 0 for r in ops.values())
    assert data["bytes_per_million"] > 0


@pytest.mark.slow
def test_report_markdown_has_headline_and_every_table(report: tuple[dict[str, Any], str]) -> None:
    data, markdown = report
    assert data["machine"]["cores"] > 0 and data["date"]
    headline = markdown.split("## Headline", 1)[1].split("\n## ", 1)[0]
    for figure in (
        "T = 0: output identical to target-only, every prompt",
        "ours detailed / mlx-lm speculative tok/s",
        "acceptance ours / mlx-lm",
        "expected acceptance per proposal on the target's own text",
        "untrained draft, adaptive K: speedup over target-only",
        "measured / Leviathan bound",
        "daemon / in-process engine tok/s",
        "daemon peak RSS / (weights + KV caches)",
        "daemon RSS once idle after the clients / (weights + KV caches)",
        "learning: held-out same-domain acceptance, teacher-forced",
        "learning: unrelated-prompt acceptance, teacher-forced",
        "workloads: T = 0 output identical to target-only",
        "ours hybrid / prompt-lookup baseline",
        "history drafter memory per million tokens",
    ):
        assert figure in headline, figure
    # Every T = 0 method matched the target in smoke mode, and the headline says so.
    assert "| T = 0: output identical to target-only, every prompt | 12 of 12 methods |" in headline
    for table in (
        "| T | draft | method |",
        "| daemon, 1 client |",
        "| held-out acceptance,",
        "| workload | method |",
    ):
        assert table in markdown


@pytest.mark.slow
def test_headline_rerenders_from_the_json_alone(
    report: tuple[dict[str, Any], str], tmp_path: Path
) -> None:
    """bench/headline.py rebuilds latest.md's headline from latest.json: same run, same table."""
    data, markdown = report
    _write_report(tmp_path, data, markdown.replace("12 of 12 methods", "stale"))
    subprocess.run([sys.executable, str(REPO / "bench" / "headline.py"), str(tmp_path)], check=True)
    assert (tmp_path / "latest.md").read_text() == markdown


@pytest.mark.slow
def test_merge_reruns_one_benchmark_and_keeps_the_others(
    report: tuple[dict[str, Any], str], tmp_path: Path
) -> None:
    data, markdown = report
    _write_report(tmp_path, data, markdown)
    command = [sys.executable, str(REPO / "bench" / "run_all.py"), "--smoke", "--only", "daemon"]
    subprocess.run(
        [*command, "--merge", "--out", str(tmp_path)], env=_clean_env(), check=True, timeout=600
    )
    merged = json.loads((tmp_path / "latest.json").read_text())
    assert merged["benchmarks"]["speculative"] == data["benchmarks"]["speculative"]
    assert merged["benchmarks"]["learning"] == data["benchmarks"]["learning"]
    assert merged["runs"]["speculative"] == data["runs"]["speculative"]
    assert merged["runs"]["daemon"]["date"] >= data["runs"]["daemon"]["date"]
    text = (tmp_path / "latest.md").read_text()
    for section in ("## Headline", "## speculative", "## daemon", "## learning"):
        assert section in text


def test_headline_learning_speedup_compares_the_same_method_before_and_after() -> None:
    """The best "after" is quoted with that same method's "before", not another head's."""
    sys.path.insert(0, str(REPO / "bench"))
    import headline

    committed = json.loads((REPO / "bench" / "results" / "latest.json").read_text())
    learning = json.loads(json.dumps(committed["benchmarks"]["learning"]))
    learning["heldout"].update(speedup_before=0.5, speedup_after=0.9, speedup_k4_after=0.6)
    learning["draft_vocab"].update(speedup_before=0.8, speedup_after=1.2)
    rows = {name: measured for name, measured, _ in headline.learning_rows(learning)}
    quoted = rows["learning: same-domain speedup over target-only after training"]
    assert quoted == f"1.20x ({learning['draft_vocab']['size']}-token head; before 0.80x)"
    learning["draft_vocab"]["speedup_after"] = 0.7  # now fixed K = 4 is the best: no "before"
    learning["heldout"]["speedup_k4_after"] = 1.1
    rows = {name: measured for name, measured, _ in headline.learning_rows(learning)}
    assert rows["learning: same-domain speedup over target-only after training"] == "1.10x (K = 4)"
