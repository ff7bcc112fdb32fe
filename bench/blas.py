"""Which BLAS makes a Linux CPU fastest at what speculative decoding does: one target pass over
1 token (decoding) and over a few (verifying K + 1 tokens), side by side, in one run.

MLX on Linux does its matrix products through whichever BLAS is loaded before it
(daemon/blas.py), and a process cannot switch once MLX is imported, so every BLAS found here
(Debian's OpenBLAS; the `mkl` wheel in this environment, as the daemon sets it up and with
MKL's own buffer pool left on) runs in child processes, one after another, alternating the
order every round. Each child loads the target, fills a 256-token KV cache and times a target
pass at each width (median of its repeats). Per width the report gives each one's median over
rounds with its range, and paired ratios (OpenBLAS against MKL; the pool against none).

Each child also checks what lossless T = 0 output rests on: that a row's logits in a pass of
width w are the same as those of one-token passes over the same tokens (the most any logit
moves, and whether the argmax ever differs), and reports its resident memory.

    python bench/blas.py [--json PATH] [--rounds N] [--target SPEC] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# (Imports speclora.daemon.blas, which loads the BLAS SPECLORA_BLAS_PATH names: in a child,
# the one it was started for.)
from daemon import spread  # noqa: E402

WIDTHS = (1, 2, 3, 5, 9, 17, 25)  # a plain step, K + 1 for K = 1, 2, 4, 8, 16, and 24 (history)
CONTEXT_TOKENS = 256
REPEATS = 5


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rss_mib() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def child(target: str, widths: tuple[int, ...], repeats: int, mkl_pool: bool) -> dict[str, Any]:
    """Runs in a process of its own, with SPECLORA_BLAS_PATH naming the BLAS."""
    from speclora.daemon.blas import preload_blas

    info = preload_blas()
    if mkl_pool:  # MKL reads it at its first allocation, which is still to come
        os.environ.pop("MKL_DISABLE_FAST_MM", None)
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
    from speclora.daemon.models import load_model

    model = load_model(target).model
    vocab = model.model.embed_tokens.weight.shape[0]
    rng = np.random.default_rng(0)
    cache = make_prompt_cache(model)
    context = mx.array(rng.integers(0, vocab, CONTEXT_TOKENS), mx.uint32)
    model(context[None], cache=cache)
    mx.eval([c.state for c in cache])

    def timed(tokens: mx.array) -> float:
        start = time.perf_counter()
        mx.eval(model(tokens[None], cache=cache))
        seconds = time.perf_counter() - start
        trim_prompt_cache(cache, tokens.shape[0])
        return seconds

    times: dict[int, list[float]] = {w: [] for w in widths}
    for w in widths:  # warm every shape's kernels
        timed(mx.array(rng.integers(0, vocab, w), mx.uint32))
    for _ in range(repeats):
        for w in widths:
            times[w].append(timed(mx.array(rng.integers(0, vocab, w), mx.uint32)))

    # A pass of width w against w one-token passes over the same tokens.
    widest = max(widths)
    tokens = mx.array(rng.integers(0, vocab, widest), mx.uint32)
    singles = []
    for i in range(widest):
        singles.append(model(tokens[i : i + 1][None], cache=cache)[0, 0])
        mx.eval(singles[-1])
    trim_prompt_cache(cache, widest)
    single = mx.stack(singles)
    consistency = {}
    for w in widths[1:]:
        wide = model(tokens[:w][None], cache=cache)[0]
        trim_prompt_cache(cache, w)
        diff = float(mx.max(mx.abs(wide - single[:w])).item())
        same = bool(mx.array_equal(mx.argmax(wide, -1), mx.argmax(single[:w], -1)).item())
        consistency[str(w)] = {"max_abs_logit_diff": diff, "argmax_same": same}
    return {
        "blas": info.name,
        "path": info.path,
        "ms": {str(w): 1e3 * statistics.median(t) for w, t in times.items()},
        "consistency": consistency,
        "rss_mib": rss_mib(),
    }


MKL_POOL = "mkl, its own buffer pool"
# (variant, the one it is compared with) for the paired ratios.
COMPARISONS = (("mkl", "openblas"), (MKL_POOL, "mkl"))


def available_blas() -> dict[str, tuple[str, bool]]:
    """variant -> (library path, MKL's buffer pool on) for every BLAS this machine has."""
    from speclora.daemon.blas import MKL_NAMES, OPENBLAS_CANDIDATES

    found: dict[str, tuple[str, bool]] = {}
    for path in OPENBLAS_CANDIDATES:
        if Path(path).is_absolute() and Path(path).exists():
            found["openblas"] = (path, False)
            break
    for name in MKL_NAMES:
        path = Path(sys.prefix) / "lib" / name
        if path.exists():
            found["mkl"] = (str(path), False)
            found[MKL_POOL] = (str(path), True)
            break
    return found


def run_child(path: str, mkl_pool: bool, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "SPECLORA_BLAS_PATH": path}
    env.pop("MKL_DISABLE_FAST_MM", None)  # the daemon's setting, unless a variant undoes it
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--target", args.target]
    command += ["--repeats", str(args.repeats), "--widths", ",".join(map(str, args.widths))]
    command += ["--mkl-pool"] if mkl_pool else []
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child for {path} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: dict[str, list[dict[str, Any]]], widths: tuple[int, ...]) -> dict[str, Any]:
    per_blas = {}
    for name, results in runs.items():
        per_blas[name] = {
            "path": results[0]["path"],
            "ms": {str(w): spread([r["ms"][str(w)] for r in results]) for w in widths},
            "cost_over_one_token": {
                str(w): spread([r["ms"][str(w)] / r["ms"]["1"] for r in results]) for w in widths
            },
            "consistency": results[-1]["consistency"],
            "rss_mib": results[-1]["rss_mib"],
        }
    ratios = {
        f"{a} / {b}": {
            str(w): spread(
                [x["ms"][str(w)] / y["ms"][str(w)] for x, y in zip(runs[a], runs[b], strict=True)]
            )
            for w in widths
        }
        for a, b in COMPARISONS
        if a in runs and b in runs
    }
    return {"blas": per_blas, "time_ratios": ratios}


def markdown(summary: dict[str, Any], widths: tuple[int, ...], rounds: int) -> str:
    names = list(summary["blas"])
    ratios = list(summary["time_ratios"])
    lines = [
        f"Target pass time by width (tokens in the pass), median of {rounds} rounds (range); "
        "time ratios are paired per round.",
        "",
        "| width | "
        + " | ".join([f"{n} ms" for n in names] + [f"{n} / 1 token" for n in names] + ratios)
        + " |",
        "|---" * (1 + 2 * len(names) + len(ratios)) + "|",
    ]

    def cell(s: dict[str, float], fmt: str) -> str:
        return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"

    for w in widths:
        row = [str(w)]
        row += [cell(summary["blas"][n]["ms"][str(w)], ".1f") for n in names]
        row += [cell(summary["blas"][n]["cost_over_one_token"][str(w)], ".2f") for n in names]
        row += [cell(summary["time_ratios"][r][str(w)], ".2f") for r in ratios]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "| BLAS | path | a row of a wide pass vs one-token passes: most a logit moves; argmax "
        "ever differs | RSS after the passes (peak), MiB |",
        "|---|---|---|---|",
    ]
    for n in names:
        b = summary["blas"][n]
        worst = max(c["max_abs_logit_diff"] for c in b["consistency"].values())
        differs = [w for w, c in b["consistency"].items() if not c["argmax_same"]]
        where = "at widths " + ", ".join(differs) if differs else "never"
        lines.append(
            f"| {n} | {b['path']} | {worst:.2e}; {where} | "
            f"{b['rss_mib']['VmRSS']:.0f} ({b['rss_mib']['VmHWM']:.0f}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="embedded")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny model, one round")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mkl-pool", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.widths = tuple(int(w) for w in str(args.widths).split(","))
    if args.child:
        print(json.dumps(child(args.target, args.widths, args.repeats, args.mkl_pool)))
        return 0
    if args.smoke:
        import tempfile

        from speclora.daemon.tiny import write_tiny_pair

        target, _ = write_tiny_pair(Path(tempfile.mkdtemp(prefix="speclora-blas-")))
        args.target, args.rounds, args.repeats, args.widths = str(target), 1, 1, (1, 2, 5)
    found = available_blas()
    if not found:
        raise SystemExit("no BLAS library found to compare")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in found}
    for r in range(args.rounds):
        order = list(found) if r % 2 == 0 else list(reversed(found))
        for name in order:
            log(f"round {r + 1}/{args.rounds}: {name}")
            runs[name].append(run_child(*found[name], args))
    summary = summarise(runs, args.widths)
    text = markdown(summary, args.widths, args.rounds)
    print(text)
    if args.json:
        report = {"summary": summary, "runs": runs, "markdown": text, "target": args.target}
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
