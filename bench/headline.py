"""The headline figures of one `make bench` run, beside the targets the issues set.

`make bench` (bench/run_all.py) puts this table at the top of bench/results/latest.md, and
README's results table is copied from it. Every figure is read from that run's JSON; a
benchmark that did not run simply has no rows.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

Row = tuple[str, str, str]  # (figure, measured, target)


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def speculative_rows(spec: dict[str, Any]) -> Iterator[Row]:
    rows, k = spec["rows"], str(spec["k"])
    checked = [
        r
        for r in rows
        if r["temperature"] == 0.0
        and r["identical"] is not None
        and not r["method"].startswith("target-only")
    ]
    same = sum(1 for r in checked if r["identical"])
    yield (
        "T = 0: output identical to target-only, every prompt",
        f"{same} of {len(checked)} methods",
        "all",
    )
    drafts = [d for d in ("untrained", "trained") if _find(rows, draft=d)]
    for draft in drafts:
        ours = _find(rows, temperature=0.0, draft=draft, method="ours detailed", k=k)
        theirs = _find(rows, temperature=0.0, draft=draft, method="mlx-lm speculative", k=k)
        if ours and theirs:
            yield (
                f"T = 0, {draft} draft: ours detailed / mlx-lm speculative tok/s, K = {k}",
                _f(_ratio(ours["tokens_per_second"], theirs["tokens_per_second"])),
                ">= 1.0 (goal 1.1)",
            )
    for draft in drafts:
        theirs = _find(rows, temperature=0.0, draft=draft, method="mlx-lm speculative", k=k)
        for ours in rows:
            if (ours["temperature"], ours["draft"], ours["k"]) == (0.0, draft, k) and (
                "draft vocab" in ours["method"]
            ):
                yield (
                    f"T = 0, {draft} draft: ours detailed with the {ours['method'].split()[-1]}"
                    f"-token draft head (the default) / mlx-lm speculative tok/s, K = {k}",
                    _f(_ratio(ours["tokens_per_second"], theirs and theirs["tokens_per_second"])),
                    ">= 1.0 (goal 1.1)",
                )
    for draft in drafts:
        ours = _find(rows, temperature=1.0, draft=draft, method="ours detailed", k=k)
        theirs = _find(rows, temperature=1.0, draft=draft, method="mlx-lm speculative", k=k)
        if ours and theirs:
            yield (
                f"T = 1, {draft} draft: acceptance ours / mlx-lm, K = {k}",
                f"{_f(_ratio(ours['acceptance'], theirs['acceptance']))} "
                f"({_f(ours['acceptance'], 3)} / {_f(theirs['acceptance'], 3)})",
                ">= 1.3",
            )
    for draft, e in spec.get("expected_acceptance", {}).items():
        yield (
            f"T = {e['temperature']:g}, {draft} draft: expected acceptance per proposal on the "
            "target's own text, ours sum min(p, q) / mlx-lm sum p q",
            f"{_f(_ratio(e['ours'], e['mlx_lm']))} ({_f(e['ours'], 3)} / {_f(e['mlx_lm'], 3)})",
            ">= 1.3",
        )
    for t in (0.0, 1.0):
        row = _find(rows, temperature=t, draft="untrained", method="ours detailed", k="adaptive")
        if row:
            yield (
                f"T = {t:g}, untrained draft, adaptive K: speedup over target-only",
                _f(row["speedup"]),
                ">= 0.95",
            )
    for t in (0.0, 1.0):
        for kk in (k, "adaptive"):
            row = _find(rows, temperature=t, draft="trained", method="ours detailed", k=kk)
            if row:
                yield (
                    f"T = {t:g}, trained draft, K = {kk}: speedup; measured / Leviathan bound",
                    f"{_f(row['speedup'])}x; {_f(row['measured_over_bound'])} "
                    f"(alpha {_f(row.get('bound_alpha') or row['alpha'])}, c {_f(row['c'])})",
                    ">= 0.9 of the bound",
                )
    for draft, costs in spec.get("costs", {}).items():
        wide = costs.get(f"target_{int(k) + 1}_ms")
        if wide and costs.get("target_1_ms"):
            r = wide / costs["target_1_ms"]
            c = costs["draft_1_ms"] / costs["target_1_ms"]
            yield (
                f"{draft} draft: target pass over K + 1 = {int(k) + 1} tokens / over 1 token "
                "(the bound assumes 1.0)",
                f"{r:.2f}, which caps measured / bound at {(int(k) * c + 1) / (int(k) * c + r):.2f}"
                f" for K = {k} (c {c:.2f})",
                "",
            )
    for row in rows:
        if "draft vocab" in row["method"] and row["draft"] == "trained":
            plain = _find(
                rows,
                temperature=row["temperature"],
                draft="trained",
                method="ours detailed",
                k=row["k"],
            )
            yield (
                f"T = {row['temperature']:g}, trained draft, K = {row['k']}: speedup with the "
                f"{row['method'].split()[-1]}-token draft head vs the full head",
                f"{_f(row['speedup'])}x vs {_f(plain and plain['speedup'])}x "
                f"(c {_f(row['c'])} vs {_f(plain and plain['c'])}; measured / bound "
                f"{_f(row['measured_over_bound'])})",
                "kept only if it pays",
            )


def daemon_rows(d: dict[str, Any]) -> Iterator[Row]:
    yield ("daemon / in-process engine tok/s", _f(d["daemon_vs_in_process"]), ">= 0.95")
    goals = d["targets"]["concurrent_vs_single"]
    if not isinstance(goals, dict):  # (results from before batching: one N, goal 1.0)
        goals = {str(d["clients"]): goals}
    for n, c in d.get(
        "concurrent", {str(d["clients"]): {"vs_single": d["concurrent_vs_single"]}}
    ).items():
        rounds = c.get("vs_single_per_round")
        spread = f" (rounds {min(rounds):.2f} .. {max(rounds):.2f})" if rounds else ""
        yield (
            f"{n} concurrent clients / 1 client, aggregate tok/s (passes batched, every "
            f"request at K = {d['draft_tokens']})",
            f"{_f(c['vs_single'])}{spread}",
            f">= {goals.get(n, '')}",
        )
    for n, c in d.get("concurrent_defaults", {}).items():  # (results from before lack it)
        rounds = c["vs_single_per_round"]
        yield (
            f"{n} concurrent clients / 1 client at the defaults (adaptive K), aggregate tok/s",
            f"{_f(c['vs_single'])} (rounds {min(rounds):.2f} .. {max(rounds):.2f}; fastest / "
            f"slowest client {_f(c['fairness_max_over_min'])})",
            f">= {goals.get(n, '')}",
        )
    web = d.get("http_concurrent")
    if web:
        yield (
            f"{web['clients']} concurrent HTTP clients / 1 gRPC client, aggregate tok/s",
            _f(web["vs_single_grpc"]),
            f">= {goals.get(str(web['clients']), '')}",
        )
    plain = d.get("unbatched")
    if plain:
        yield (
            "1 client, batched daemon / unbatched daemon tok/s",
            _f(plain["batched_single_over_unbatched_single"], 3),
            ">= 0.97",
        )
        for key, value in plain.items():
            if key.startswith("unbatched_") and key.endswith("_clients_vs_single"):
                n = key.split("_")[1]
                yield (f"{n} concurrent clients / 1 client, unbatched daemon", _f(value), "")
    yield ("fairness: fastest / slowest client", _f(d["fairness_max_over_min"], 3), "<= 1.5")
    m, mib = d["memory"], 2**20
    yield (
        "daemon peak RSS / (weights + KV caches)",
        f"{_f(m['peak_rss_over_weights_plus_kv'])} ({m['peak_rss_bytes'] / mib:.0f} MiB for "
        f"{m['weight_bytes'] / mib:.0f} + {m['kv_cache_bytes'] / mib:.0f} MiB"
        f"{_prompt_cache_part(m)})",
        "<= 1.25",
    )
    if "memory_defaults" in d:  # (results from before it lack it)
        md = d["memory_defaults"]
        yield (
            "daemon peak RSS / (weights + KV caches), the same clients with the defaults "
            "(adaptive K, history proposals up to history.max_proposal)",
            f"{_f(md['peak_rss_over_weights_plus_kv'])} ({md['peak_rss_bytes'] / mib:.0f} MiB)",
            "<= 1.25",
        )
    yield (
        "daemon RSS once idle after the clients / (weights + KV caches)",
        f"{_f(m['rss_over_weights_plus_kv'])} ({m['rss_bytes'] / mib:.0f} MiB)",
        "<= 1.25",
    )
    if "chat_ttft_fresh_over_cached" in d:  # (results from before the prompt cache lack it)
        turns = d["chat_turns"]
        yield (
            f"prompt cache: a {len(turns)}-turn chat's time to first token, turns 2-{len(turns)}, "
            "without / with it",
            f"{_f(d['chat_ttft_fresh_over_cached'])} ({sum(t['cached_prompt_tokens'] for t in turns)}"
            f" of {sum(t['prompt_tokens'] for t in turns)} prompt tokens reused; output identical: "
            f"{'yes' if d['chat_identical'] else 'NO'})",
            "> 1, identical",
        )


def _prompt_cache_part(m: dict[str, Any]) -> str:
    held = m.get("prompt_cache_bytes")
    return f", of which the prompt cache holds {held / 2**20:.0f}" if held else ""


def learning_rows(lr: dict[str, Any]) -> Iterator[Row]:
    h, u, t = lr["heldout"], lr["unrelated"], lr["training"]
    vocab = lr.get("draft_vocab")
    # Acceptance is judged with the head the daemon serves with: the cheap one when measured.
    head = f" ({vocab['size']}-token draft head, as served)" if vocab else ""
    yield (
        "learning: training run",
        f"{t['steps']} steps in {t['seconds']:.0f} s on {t['train_cases']} recorded cases",
        "<= 300 s",
    )
    yield (
        f"learning: held-out same-domain acceptance, teacher-forced{head}",
        f"{_f(h['teacher_forced_acceptance_before'], 3)} -> "
        f"{_f(h['teacher_forced_acceptance_after'], 3)}",
        "~0.04 -> >= 0.6",
    )
    if vocab:
        engine = (vocab["engine_acceptance_before"], vocab["engine_acceptance_after"])
    else:
        engine = (h["engine_acceptance_adaptive_before"], h["engine_acceptance_adaptive_after"])
    yield (
        f"learning: held-out engine acceptance, adaptive K{head}",
        f"{_f(engine[0], 3)} -> {_f(engine[1], 3)}",
        "",
    )
    # (method, after, before): "before" is the same method's, so the pair compares like with like.
    best = max(
        [("adaptive K", h["speedup_after"], h["speedup_before"])]
        + [(f"K = {k[9:-6]}", v, None) for k, v in h.items() if k.startswith("speedup_k")]
        + (
            [(f"{v['size']}-token head", v["speedup_after"], v["speedup_before"])]
            if (v := lr.get("draft_vocab"))
            else []
        ),
        key=lambda row: row[1],
    )
    before = f"; before {_f(best[2])}x" if best[2] is not None else ""
    yield (
        "learning: same-domain speedup over target-only after training",
        f"{_f(best[1])}x ({best[0]}{before})",
        ">= 1.3",
    )
    yield (
        f"learning: unrelated-prompt acceptance, teacher-forced{head}",
        f"{_f(u['teacher_forced_acceptance_before'], 3)} -> "
        f"{_f(u['teacher_forced_acceptance_after'], 3)}",
        "drop <= 0.02",
    )
    yield (
        "learning: T = 0 output identical to target",
        "yes" if h["identical_to_target_greedy"] else "NO",
        "yes",
    )


# Workload -> the speedup over target-only the hybrid is held to (issue 16's figures; (g),
# structured output, is issue 22's, against unconstrained target-only).
WORKLOAD_TARGETS = {"a": ">= 2.0", "b": ">= 2.0", "c": ">= 0.95", "d": ">= 1.5", "e": ">= 1.3",
                    "f": ">= 0.95", "g": ">= 1.3"}  # fmt: skip
EXTRACTION = "g"  # the structured-output workload: its own methods and figures


def workload_rows(w: dict[str, Any]) -> Iterator[Row]:
    rows = w["rows"]
    same = sum(r["identical"] for r in rows)
    what = "target-only" + (
        " (constrained target-only for (g))" if EXTRACTION in w["workloads"] else ""
    )
    yield (f"workloads: T = 0 output identical to {what}", f"{same} of {len(rows)} rows", "all")
    for key, name in w["workloads"].items():
        mine = {r["method"]: r for r in rows if r["workload"] == key}
        if key == EXTRACTION:
            yield from extraction_rows(key, name, mine)
            continue
        hybrid, lookup = mine["ours hybrid"], mine["prompt lookup (vLLM ngram)"]
        history = hybrid["history_share"]
        draft = hybrid["draft_share"]
        yield (
            f"workload ({key}) {name}: ours hybrid / target-only, decode tok/s (median, range)",
            f"{_f(hybrid['speedup'])}x ({_f(hybrid['speedup_min'])}-{_f(hybrid['speedup_max'])});"
            f" tokens from history {history:.0%}, draft {draft:.0%}",
            WORKLOAD_TARGETS.get(key, ""),
        )
        yield (
            f"workload ({key}): ours hybrid / prompt-lookup baseline",
            _f(hybrid["speedup"] / lookup["speedup"]) if lookup["speedup"] else "-",
            ">= 1.2" if key in "de" else ">= 1.0",
        )


def extraction_rows(key: str, name: str, mine: dict[str, dict[str, Any]]) -> Iterator[Row]:
    """(g): every constrained output validated; the daemon's default (hybrid + grammar) against
    unconstrained target-only, with the grammar's forced tokens apart from history's."""
    checked = [r for r in mine.values() if r.get("checked")]
    valid = sum(round(r["valid"] * r["checked"]) for r in checked)
    total = sum(r["checked"] for r in checked)
    yield (
        f"workload ({key}) {name}: outputs that parse and validate against the schema, every "
        "constrained method",
        f"{valid} of {total}",
        "all",
    )
    for method in ("ours hybrid + grammar", "ours grammar-only (forced tokens)"):
        r = mine.get(method)
        if r is None:
            continue
        yield (
            f"workload ({key}): {method} / unconstrained target-only, decode tok/s (median, range)",
            f"{_f(r['speedup'])}x ({_f(r['speedup_min'])}-{_f(r['speedup_max'])}); tokens "
            f"forced by the grammar {r['grammar_share']:.0%}, from history "
            f"{r['history_share']:.0%}, draft {r['draft_share']:.0%}",
            WORKLOAD_TARGETS.get(key, "") if method.startswith("ours hybrid") else "",
        )


def history_rows(h: dict[str, Any]) -> Iterator[Row]:
    by = {r["operation"]: r for r in h["rows"]}
    tokens = f"{h['history_tokens'] / 1e6:.2f}M"
    for name, row in by.items():
        if name.startswith(("propose", "extend")):
            yield (
                f"history drafter at {tokens} tokens: {name}, median / one-token target pass",
                f"{100 * row['of_target_pass']:.2f}% ({row['median_ms']:.3f} ms)",
                "< 1%",
            )
    yield (
        "history drafter memory per million tokens (history.max_tokens bounds it)",
        f"{h['bytes_per_million'] / (1 << 20):.1f} MiB",
        "bounded",
    )


def headline_markdown(benchmarks: dict[str, Any]) -> str:
    rows: list[Row] = []
    for name, fn in (
        ("speculative", speculative_rows),
        ("daemon", daemon_rows),
        ("learning", learning_rows),
        ("workloads", workload_rows),
        ("history", history_rows),
    ):
        if name in benchmarks:
            rows += list(fn(benchmarks[name]))  # type: ignore[operator]
    lines = ["| figure | measured | target |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def rewrite_report(results_dir: Path) -> None:
    """Re-render latest.md from latest.json (the same run's numbers), after a change to what
    the headline shows; run_all.render is the one writer of that file."""
    from run_all import render  # bench/ is on sys.path when run as a script

    report = json.loads((results_dir / "latest.json").read_text())
    (results_dir / "latest.md").write_text(render(report))


README_BEGIN = "<!-- make bench headline: begin -->"
README_END = "<!-- make bench headline: end -->"


def readme_block(report: dict[str, Any]) -> str:
    """README's results table: the headline of a report, with when and where it was measured."""
    m = report["machine"]
    runs = report.get("runs", {})
    benches = report["benchmarks"]
    # Each bench says which BLAS (and CPU attention) it ran on: one may predate a change of it.
    at = "; ".join(
        f"{name} {run['date'][:16].replace('T', ' ')} UTC at {run['commit']}, BLAS "
        f"{benches.get(name, {}).get('blas', '?')}"
        + (f", attention {a}" if (a := benches.get(name, {}).get("attention")) else "")
        for name, run in runs.items()
    )
    return (
        f"{README_BEGIN}\n`make bench` on {m['cpu']} ({m['cores']} cores, {m['system']}); "
        f"{at or report['date'][:10]}."
        f"\n\n{headline_markdown(report['benchmarks'])}\n{README_END}"
    )


def update_readme(readme: Path, results_dir: Path) -> None:
    """Replace README's results table with the one from results_dir/latest.json."""
    report = json.loads((results_dir / "latest.json").read_text())
    text = readme.read_text()
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    readme.write_text(head + readme_block(report) + tail)


if __name__ == "__main__":
    # python bench/headline.py [RESULTS_DIR] [--readme README.md]
    args = sys.argv[1:]
    readme = None
    if "--readme" in args:
        i = args.index("--readme")
        readme = Path(args[i + 1])
        del args[i : i + 2]
    results = Path(args[0]) if args else Path(__file__).parent / "results"
    rewrite_report(results)
    if readme is not None:
        update_readme(readme, results)
