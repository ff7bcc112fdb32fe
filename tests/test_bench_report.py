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

    expected = blas_info().label  # conftest preloads it the right way
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
    # The same scaling with the controller choosing each request's K (what clients get).
    assert data["defaults_single_tokens_per_s"] > 0
    assert data["concurrent_defaults"]["4"]["vs_single"] > 0
    assert len(data["concurrent_defaults"]["4"]["per_client_tokens_per_s"]) == 4
    assert data["unbatched"]["batched_single_over_unbatched_single"] > 0
    assert data["unbatched"]["batched_4_over_unbatched_4_clients"] > 0
    assert data["http_concurrent"]["clients"] == 4 and data["http_concurrent"]["vs_single_grpc"] > 0
    assert data["fairness_max_over_min"] >= 1.0
    assert data["memory"]["peak_rss_bytes"] >= data["memory"]["rss_bytes"] > 0
    # The defaults' peak is read later in the same daemon, and peaks only rise.
    assert data["memory_defaults"]["peak_rss_bytes"] >= data["memory"]["peak_rss_bytes"]


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


EXTRACTION_METHODS = (
    "target-only (mlx-lm)",
    "ours constrained target-only",
    "ours grammar-only (forced tokens)",
    "ours hybrid + grammar",
)


@pytest.mark.slow
def test_workloads_bench(report: tuple[dict[str, Any], str]) -> None:
    """Six workloads, six methods each, every output the target's; the history drafter had a
    history to draft from where the workload gives it one. The seventh, (g) structured output,
    has its own four methods (below)."""
    data = report[0]["benchmarks"]["workloads"]
    assert set(data["workloads"]) == set("abcdefg")
    rows = data["rows"]
    assert len(rows) == 36 + len(EXTRACTION_METHODS) and all(r["identical"] for r in rows)
    by = {(r["workload"], r["method"]): r for r in rows}
    assert by[("d", "ours hybrid")]["history_tokens"] > 0  # 20 earlier requests
    assert by[("f", "ours hybrid")]["history_tokens"] == 0  # empty history
    assert all(r["speedup"] > 0 for r in rows)


@pytest.mark.slow
def test_extraction_workload_rows(report: tuple[dict[str, Any], str]) -> None:
    """(g): every constrained output parsed and validated, the speed ratio against unconstrained
    target-only (its baseline row), T = 0 identity against constrained target-only, and the
    grammar's forced tokens counted apart from history's, in the JSON and in the headline."""
    data, markdown = report
    workloads = data["benchmarks"]["workloads"]
    g = {r["method"]: r for r in workloads["rows"] if r["workload"] == "g"}
    assert tuple(g) == EXTRACTION_METHODS
    runs = workloads["prompts"] * workloads["repeats"]
    baseline = g["target-only (mlx-lm)"]
    # Its opening run over the round's two runs together: the noise a ratio carries.
    assert 0 < baseline["speedup_min"] <= baseline["speedup"] <= baseline["speedup_max"]
    assert baseline["checked"] == 0 and baseline["valid"] is None  # unconstrained: not checked
    assert baseline["grammar_share"] == 0.0
    for method in EXTRACTION_METHODS[1:]:
        row = g[method]
        assert row["checked"] == runs and row["valid"] == 1.0, row
        assert row["identical"] is True  # against constrained target-only, token for token
        assert row["speedup_min"] <= row["speedup"] <= row["speedup_max"]
        # Against the baseline's speed over as many tokens as this run wrote, and (for the
        # record) over its whole, usually longer, output.
        assert row["speedup_whole_baseline"] > 0 and row["output_tokens"] > 0
        for share in ("grammar_share", "history_share", "draft_share"):
            assert 0.0 <= row[share] <= 1.0
        assert row["grammar_share"] + row["history_share"] + row["draft_share"] <= 1.0 + 1e-9
    assert g["ours grammar-only (forced tokens)"]["grammar_share"] > 0.0
    assert g["ours grammar-only (forced tokens)"]["history_share"] == 0.0
    assert g["ours hybrid + grammar"]["history_tokens"] > 0  # the two earlier extractions
    headline = markdown.split("## Headline", 1)[1].split("\n## ", 1)[0]
    assert (
        f"outputs that parse and validate against the schema, every constrained method | "
        f"{3 * runs} of {3 * runs} |" in headline
    )
    assert "ours hybrid + grammar / unconstrained target-only, decode tok/s" in headline
    assert "tokens forced by the grammar" in headline
    assert "(g) extraction to a JSON schema:" in markdown  # its own table
    assert "| method | output tokens | decode tok/s | speedup vs unconstrained target-only |" in (
        markdown
    )


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
        "4 concurrent clients / 1 client at the defaults (adaptive K), aggregate tok/s",
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


def test_headline_extraction_rows() -> None:
    """(g)'s headline rows: validity over every constrained output, and the default method's
    ratio against unconstrained target-only with forced, history and draft tokens apart; the
    other workloads' rows are unchanged by it."""
    sys.path.insert(0, str(REPO / "bench"))
    import headline

    def row(workload: str, method: str, **kw: Any) -> dict[str, Any]:
        base = dict(workload=workload, method=method, speedup=1.0, speedup_min=1.0,
                    speedup_max=1.0, history_share=0.0, draft_share=0.0, identical=True)  # fmt: skip
        return {**base, **kw}

    rows = [row("f", m) for m in ("target-only (mlx-lm)", "prompt lookup (vLLM ngram)")]
    rows.append(row("f", "ours hybrid", speedup=0.97, speedup_min=0.9, speedup_max=1.02))
    rows.append(row("g", "target-only (mlx-lm)", grammar_share=0.0, valid=None, checked=0))
    for method, speedup, forced, history in (
        ("ours constrained target-only", 0.95, 0.01, 0.0),
        ("ours grammar-only (forced tokens)", 1.6, 0.45, 0.0),
        ("ours hybrid + grammar", 1.9, 0.3, 0.4),
    ):
        rows.append(row("g", method, speedup=speedup, speedup_min=speedup - 0.2,
                        speedup_max=speedup + 0.3, grammar_share=forced, history_share=history,
                        valid=0.875 if method.startswith("ours hybrid") else 1.0, checked=8))  # fmt: skip
    w = {"workloads": {"f": "novel", "g": "extraction to a JSON schema"}, "rows": rows}
    out = {name: (measured, target) for name, measured, target in headline.workload_rows(w)}
    assert out[
        "workloads: T = 0 output identical to target-only (constrained target-only for (g))"
    ] == ("7 of 7 rows", "all")
    assert out[
        "workload (g) extraction to a JSON schema: outputs that parse and validate against the "
        "schema, every constrained method"
    ] == ("23 of 24", "all")
    assert out[
        "workload (g): ours hybrid + grammar / unconstrained target-only, decode tok/s "
        "(median, range)"
    ] == (
        "1.90x (1.70-2.20); tokens forced by the grammar 30%, from history 40%, draft 0%",
        ">= 1.3",
    )
    assert "workload (f): ours hybrid / prompt-lookup baseline" in out
    assert not any("(g): ours hybrid / prompt-lookup" in name for name in out)


def test_workload_rounds_take_both_target_only_runs_as_their_baseline() -> None:
    """A round's baseline is its opening and closing target-only runs together (their tokens
    over their time), over as many tokens as the compared run wrote where it is given."""
    sys.path.insert(0, str(REPO / "bench"))
    import workloads

    # 11 tokens: decode spans 10 tokens over 1 s (10 tok/s) and over 0.5 s (20 tok/s).
    opening = workloads.Run(list(range(11)), 0.5, 1.5, times=[0.5 + 0.1 * i for i in range(11)])
    closing = workloads.Run(list(range(11)), 0.5, 1.0, times=[0.5 + 0.05 * i for i in range(11)])
    decode, e2e = workloads._bracketed(opening, closing, None)
    assert decode == pytest.approx(20 / 1.5)  # 20 tokens in 1.5 s, not the mean rate 15
    assert e2e == pytest.approx(2 / (1.5 / 11 + 1.0 / 11))
    # Over the first 6 tokens: 5 over 0.5 s and over 0.25 s.
    assert workloads._bracketed(opening, closing, 6)[0] == pytest.approx(10 / 0.75)
    assert workloads._bracketed(opening, workloads.Run([1], 0.1, 0.1), None)[0] == 0.0


def test_workload_rounds_rotate_the_methods_after_the_opening_baseline() -> None:
    sys.path.insert(0, str(REPO / "bench"))
    import workloads

    orders = [workloads.round_order(6, index) for index in range(10)]
    assert all(order[0] == 0 and sorted(order) == list(range(6)) for order in orders)
    for method in range(1, 6):  # each takes every place once in any 5 rounds in a row
        assert sorted(order.index(method) for order in orders[3:8]) == [1, 2, 3, 4, 5]
    assert workloads.round_order(1, 3) == [0]
