"""Speculative decoding, side by side: target-only, mlx-lm's speculative, ours fast and detailed.

On the embedded pair (SmolLM2-135M-Instruct target, `self:4` draft) by default, or the pair
given by --target/--draft, over a fixed prompt set, at T = 0 and T = 1, fixed K and adaptive K,
with the draft as loaded ("untrained") and after a short KL distillation on target outputs
("trained", LoRA on the draft's layers plus its own final norm, a minute or two on CPU), so the
table shows a draft that is good and not only one that is useless.

Every method runs on every prompt in turn (round-robin), so load from other processes hits all
methods alike; tokens/s is completion tokens over wall time, prefill included.

Columns: tok/s; speedup over target-only at the same temperature; acceptance (accepted /
proposed, the daemon's figure); alpha, the per-position acceptance (accepted / (accepted +
rejections), the i.i.d. estimate Leviathan's formula uses); tokens per target pass; c, draft
pass / target pass time as measured here; the bound (1 - alpha^(K+1)) / ((1 - alpha)(K c + 1))
(for adaptive rows, the best K's at the alpha the same head showed at fixed K, so a controller
that seldom drafts cannot lower its own bar); measured speedup / bound; and for T = 0 whether every
prompt's output is token-for-token the target's.

    python bench/speculative.py [--json PATH] [--smoke] [--target X --draft Y] [-k 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# OpenBLAS must be loaded before the first mlx import, or MLX binds the wheel's reference BLAS
# (a K+1-token verify then costs K+1 passes). `isort: split` keeps the import sorter from
# moving it below mlx, which it once did, silently slowing every row of this benchmark.
import speclora.daemon.blas
import speclora.daemon.cpu_attention

# isort: split
import mlx.core as mx
import mlx.nn as nn
from mlx_lm import stream_generate
from mlx_lm.models.cache import make_prompt_cache
from speclora.daemon.engine import (
    AcceptanceMemory,
    DraftVocab,
    GenerationRequest,
    SamplingParams,
    generate,
    measure_prices,
    speedup_bound,
)
from speclora.daemon.engine.draft_vocab import model_parts
from speclora.daemon.engine.fast import seeded_sampler
from speclora.daemon.engine.prompt import build_prompt_tokens
from speclora.daemon.memory import limit_buffer_cache
from speclora.shared.config import ModelsConfig, SpeculationConfig
from speclora.shared.logging import configure_logging

BENCH_PROMPTS = (
    "Explain in a few sentences why the sky is blue.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "List five tips for staying productive when working from home.",
    "What is the difference between a list and a tuple in Python?",
)
# Distillation data: different prompts of the same kinds, so the trained draft is measured on
# text it has not seen.
TRAIN_PROMPTS = (
    "Explain how a rainbow forms.",
    "Why do leaves change colour in autumn?",
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a Python function that sorts a list of numbers without using sort().",
    "List five healthy breakfast ideas.",
    "List three ways to save energy at home.",
    "What is the difference between a process and a thread?",
    "What is the difference between weather and climate?",
    "Describe the water cycle in simple terms.",
    "Give me three tips for learning a new language.",
    "Explain what a hash table is.",
    "Summarise the plot of Romeo and Juliet in a few sentences.",
    "How does a refrigerator keep food cold?",
    "Write a short poem about the ocean.",
    "What are the benefits of regular exercise?",
    "Explain recursion to a beginner programmer.",
    "What causes the seasons on Earth?",
    "Write a Python function that counts the vowels in a string.",
    "Give three reasons to learn to cook.",
    "What is photosynthesis?",
)


# ------------------------------------------------------------------------------ runs


@dataclass
class Run:
    tokens: list[int]
    seconds: float
    proposed: int = 0
    accepted: int = 0
    rejections: int = 0  # steps that ended in a rejection
    passes: int = 0  # target passes


@dataclass
class Row:
    temperature: float
    draft: str  # "untrained" / "trained" / "-"
    method: str
    k: str  # "4", "adaptive", "-"
    tokens: int = 0
    seconds: float = 0.0
    proposed: int = 0
    accepted: int = 0
    rejections: int = 0
    passes: int = 0
    identical: bool | None = None
    c: float | None = None
    k_value: int | None = None
    bound_alpha: float | None = None  # adaptive rows: the fixed-K row's alpha (same head)
    outputs: list[list[int]] = field(default_factory=list, repr=False)

    def add(self, run: Run) -> None:
        self.tokens += len(run.tokens)
        self.seconds += run.seconds
        self.proposed += run.proposed
        self.accepted += run.accepted
        self.rejections += run.rejections
        self.passes += run.passes
        self.outputs.append(run.tokens)

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None

    @property
    def alpha(self) -> float | None:
        tested = self.accepted + self.rejections
        return self.accepted / tested if tested else None

    @property
    def accepted_per_step(self) -> float | None:
        return self.accepted / self.passes if self.proposed and self.passes else None

    @property
    def tokens_per_pass(self) -> float:
        return self.tokens / self.passes if self.passes else 0.0

    def bound(self) -> float | None:
        alpha = self.bound_alpha if self.bound_alpha is not None else self.alpha
        if alpha is None or self.c is None:
            return None
        if self.k_value is not None:
            return speedup_bound(alpha, self.k_value, self.c)
        return max(1.0, *(speedup_bound(alpha, k, self.c) for k in range(1, 9)))


def mlx_lm_run(target, draft, tokenizer, ids, max_tokens, temperature, seed, k) -> Run:
    """mlx-lm's stream_generate, with or without its speculative decoding."""
    kwargs: dict[str, Any] = {"sampler": seeded_sampler(SamplingParams(temperature, seed=seed))}
    if draft is not None:
        kwargs.update(draft_model=draft, num_draft_tokens=k)
    run = Run([], 0.0)
    step_open, step_k, step_accepted = False, 0, 0
    start = time.perf_counter()
    for r in stream_generate(target, tokenizer, mx.array(ids), max_tokens=max_tokens, **kwargs):
        if r.token in tokenizer.eos_token_ids:
            run.tokens.append(r.token)
            break
        if not step_open:
            run.passes += 1
            step_k = min(k, max_tokens - len(run.tokens)) if draft is not None else 0
            step_accepted = 0
            run.proposed += step_k
        step_open = r.from_draft
        if r.from_draft:
            step_accepted += 1
            run.accepted += 1
        elif step_accepted < step_k:
            run.rejections += 1
        run.tokens.append(r.token)
    run.seconds = time.perf_counter() - start
    return run


def ours_run(target, draft, tokenizer, request, spec, **kw) -> Run:
    start = time.perf_counter()
    *_, summary = generate(target, draft, tokenizer, request, spec, **kw)
    run = Run(list(summary.completion_token_ids), time.perf_counter() - start)
    run.proposed, run.accepted = summary.proposed, summary.accepted
    run.rejections = len(summary.rejection_positions)
    run.passes = summary.target_passes
    return run


def expected_acceptance(target, draft, sequences, temperature: float) -> dict[str, float]:
    """Per-proposal acceptance each rule expects on the same text, free of sampling noise.

    Teacher-forced over `sequences` ((ids, prompt length): the target's own samples), at each
    completion position p and q are the target's and the draft's distributions at
    `temperature`. Our rule accepts a proposal x ~ q with probability min(1, p(x)/q(x)), so
    sum_x min(p, q) on average; mlx-lm's accepts when the target's own sample equals it,
    sum_x p q. The sampled acceptance in the table estimates the same thing from a few dozen
    accepts per row, so it moves by tens of percent between runs."""
    ours = theirs = 0.0
    positions = 0
    for seq, plen in sequences:
        if len(seq) <= plen:
            continue
        x = mx.array(seq[:-1], mx.uint32)[None]
        t = target(x)[0, plen - 1 :].astype(mx.float32)
        d = draft(x)[0, plen - 1 :].astype(mx.float32)
        width = min(t.shape[-1], d.shape[-1])
        p = mx.softmax(t[:, :width] / temperature, axis=-1)
        q = mx.softmax(d[:, :width] / temperature, axis=-1)
        ours += mx.minimum(p, q).sum().item()
        theirs += (p * q).sum().item()
        positions += len(seq) - plen
    return {
        "temperature": temperature,
        "positions": positions,
        "ours": ours / positions if positions else 0.0,
        "mlx_lm": theirs / positions if positions else 0.0,
    }


# ------------------------------------------------------------------------------ costs


def time_forward(model: Any, width: int, repeats: int = 7, fn: Callable | None = None) -> float:
    """Median seconds of one forward of `width` tokens after a 32-token context."""
    cache = make_prompt_cache(model)
    mx.eval(model(mx.zeros((1, 32), mx.uint32), cache=cache))
    times = []
    for _ in range(repeats):
        x = mx.zeros((1, width), mx.uint32)
        start = time.perf_counter()
        mx.eval(fn(x, cache) if fn else model(x, cache=cache))
        times.append(time.perf_counter() - start)
        for c in cache:
            c.trim(width)
    return sorted(times)[len(times) // 2]


def measure_costs(target, draft, k: int, vocab: DraftVocab | None) -> dict[str, float]:
    costs = {
        "target_1_ms": time_forward(target, 1) * 1e3,
        f"target_{k + 1}_ms": time_forward(target, k + 1) * 1e3,
        "draft_1_ms": time_forward(draft, 1) * 1e3,
    }
    if vocab is not None:
        _, sub = vocab.head_matrix(model_parts(draft))  # the rows generation will score
        costs["draft_restricted_1_ms"] = (
            time_forward(draft, 1, fn=lambda x, c: draft.model(x, c)[:, -1, :] @ sub.T) * 1e3
        )
    return costs


# ------------------------------------------------------------------------------ distillation


def target_completions(target, tokenizer, prompts, max_tokens) -> list[tuple[list[int], int]]:
    """(prompt + greedy completion ids, prompt length) for each prompt, one after another
    (mlx-lm's batch_generate measured 3x slower than this on 2 CPU cores)."""
    out = []
    for prompt in prompts:
        ids = build_prompt_tokens(tokenizer, GenerationRequest(prompt=prompt))
        run = mlx_lm_run(target, None, tokenizer, ids, max_tokens, 0.0, 0, 0)
        out.append((ids + run.tokens, len(ids)))
    return out


def distill(
    target: Any,
    draft: Any,
    data: list[tuple[list[int], int]],
    *,
    steps: int,
    seconds: float,
    rank: int = 16,
    learning_rate: float = 5e-4,
    batch_size: int = 4,
) -> dict[str, Any]:
    """KL(target || draft) on the completion positions of `data`: LoRA on every draft layer plus
    the draft's own final norm, then fused so the draft runs at full speed."""
    import mlx.optimizers as optim
    from mlx_lm.tuner.lora import LoRALinear
    from mlx_lm.tuner.utils import linear_to_lora_layers

    # Teacher log-probs once, for the positions that predict completion tokens.
    teacher = []
    for seq, plen in data:
        logits = target(mx.array([seq[:-1]]))[0, plen - 1 :]
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(logp)
        teacher.append(logp)

    draft.freeze()
    linear_to_lora_layers(draft, len(draft.layers), {"rank": rank, "scale": 10.0, "dropout": 0.0})
    draft.model.norm.unfreeze()
    draft.train()

    def loss_fn(model, x, t, mask, start):
        # Only the positions that predict completion tokens go through the (large) head.
        hidden = model.model(x)
        idx = start[:, None] + mx.arange(t.shape[1])[None, :]
        hidden = mx.take_along_axis(hidden, idx[..., None], axis=1)
        if model.args.tie_word_embeddings:
            logits = model.model.embed_tokens.as_linear(hidden)
        else:
            logits = model.lm_head(hidden)
        logq = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        kl = mx.sum(mx.exp(t) * (t - logq), axis=-1)
        return mx.sum(kl * mask) / mx.sum(mask)

    loss_and_grad = nn.value_and_grad(draft, loss_fn)
    optimizer = optim.Adam(learning_rate=learning_rate)
    losses = []
    began = time.perf_counter()
    order = list(range(len(data)))
    step = 0
    while step < steps and time.perf_counter() - began < seconds:
        batch = [order[(step * batch_size + i) % len(order)] for i in range(batch_size)]
        span = max(teacher[i].shape[0] for i in batch)
        # Row i's logits plen-1 .. plen-1+n-1 predict its n completion tokens; pad every row so
        # that span positions from its start exist (the extra ones are masked out).
        width = max(data[i][1] - 1 + span for i in batch)
        xs, ts, masks, starts = [], [], [], []
        for i in batch:
            seq, plen = data[i]
            t = teacher[i]
            n = t.shape[0]
            xs.append(seq[:-1] + [0] * (width - len(seq) + 1))
            ts.append(
                mx.concatenate([t, mx.zeros((span - n, t.shape[1]), t.dtype)]) if span > n else t
            )
            masks.append([1.0] * n + [0.0] * (span - n))
            starts.append(plen - 1)
        x = mx.array(xs)
        loss, grads = loss_and_grad(draft, x, mx.stack(ts), mx.array(masks), mx.array(starts))
        optimizer.update(draft, grads)
        mx.eval(draft.trainable_parameters(), optimizer.state, loss)
        losses.append(loss.item())
        step += 1
    elapsed = time.perf_counter() - began

    fused = [(name, m.fuse()) for name, m in draft.named_modules() if isinstance(m, LoRALinear)]
    draft.update_modules(_unflatten(fused))
    draft.eval()
    mx.eval(draft.parameters())
    return {
        "steps": step,
        "seconds": round(elapsed, 1),
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def _unflatten(pairs):
    from mlx.utils import tree_unflatten

    return tree_unflatten(pairs)


# ------------------------------------------------------------------------------ models


def load_models(args) -> tuple[Any, Any, Any, str]:
    """(target, draft, tokenizer, description)."""
    from speclora.daemon.models import load_pair

    limit_buffer_cache(ModelsConfig().buffer_cache_mb)  # MLX's allocator as the daemon runs it
    if args.smoke:
        from speclora.daemon.tiny import TinyModelSpec, write_tiny_model

        # Loading evaluates the weights, so the files can go as soon as the pair is loaded.
        with tempfile.TemporaryDirectory(prefix="speclora-bench-") as root:
            target_dir = write_tiny_model(Path(root) / "target", TinyModelSpec(num_layers=4))
            target, draft = load_pair(str(target_dir), "self:2")
    else:
        target, draft = load_pair(args.target, args.draft)
        if draft is None:
            raise SystemExit("this benchmark needs a draft model (--draft)")
    return target.model, draft.model, target.tokenizer, f"{target.name} / {draft.name}"


# ------------------------------------------------------------------------------ the bench


def bench_draft(
    label: str,
    target, draft, tokenizer, prompts, args, costs, vocab, reference: Row | None, temperature,
) -> list[Row]:  # fmt: skip
    """Every method on every prompt in turn, target-only first (this block's baseline; at
    T = 0 every row's outputs are compared with `reference`, else with that baseline's)."""
    k = args.k
    spec = SpeculationConfig(adaptive_max=max(args.k, 8))
    c_full = costs["draft_1_ms"] / costs["target_1_ms"]
    c_vocab = costs.get("draft_restricted_1_ms", costs["draft_1_ms"]) / costs["target_1_ms"]
    # What the daemon measures at load for the controller, with each head.
    prices = measure_prices(target, draft, max_k=spec.adaptive_max, max_verify=spec.adaptive_max)
    vocab_prices = (
        measure_prices(
            target, draft, max_k=spec.adaptive_max, max_verify=spec.adaptive_max, draft_vocab=vocab
        )
        if vocab
        else None
    )
    sampling_of = lambda seed: SamplingParams(temperature, seed=seed)  # noqa: E731

    def ours(mode: str, dk: int | None, **kw):
        def fn(ids, prompt, seed):
            request = GenerationRequest(
                prompt=prompt, max_tokens=args.max_tokens, draft_tokens=dk, mode=mode,
                sampling=sampling_of(seed),
            )  # fmt: skip
            return ours_run(target, draft, tokenizer, request, spec, prompt_tokens=ids, **kw)

        return fn

    methods: list[tuple[Row, Callable]] = [
        # Every block measures its own baseline in the same round-robin: a baseline from
        # another block, minutes earlier, would carry the machine's drift into every speedup.
        (
            Row(temperature, label, "target-only (mlx-lm)", "-"),
            lambda ids, prompt, seed: mlx_lm_run(
                target, None, tokenizer, ids, args.max_tokens, temperature, seed, 0
            ),
        ),
        (
            Row(temperature, label, "mlx-lm speculative", str(k), c=c_full, k_value=k),
            lambda ids, prompt, seed: mlx_lm_run(
                target, draft, tokenizer, ids, args.max_tokens, temperature, seed, k
            ),
        ),
        (Row(temperature, label, "ours fast", str(k), c=c_full, k_value=k), ours("fast", k)),
        (
            Row(temperature, label, "ours detailed", str(k), c=c_full, k_value=k),
            ours("detailed", k),
        ),
        (
            # One AcceptanceMemory per row across prompts, as the daemon keeps one per draft.
            Row(temperature, label, "ours detailed", "adaptive", c=c_full),
            ours("detailed", None, prices=prices, acceptance_memory=AcceptanceMemory()),
        ),
    ]
    if vocab is not None:
        methods += [
            (
                Row(temperature, label, f"ours detailed, draft vocab {vocab.size}", str(k),
                    c=c_vocab, k_value=k),
                ours("detailed", k, draft_vocab=vocab),
            ),
            (
                Row(temperature, label, f"ours detailed, draft vocab {vocab.size}", "adaptive",
                    c=c_vocab),
                ours("detailed", None, draft_vocab=vocab, prices=vocab_prices,
                     acceptance_memory=AcceptanceMemory()),
            ),
        ]  # fmt: skip
    for seed, (prompt, ids) in enumerate(prompts):
        for row, fn in methods:
            row.add(fn(ids, prompt, seed))
            print(
                f"  {label} T={temperature} {row.method} K={row.k}: prompt {seed + 1}",
                file=sys.stderr,
                flush=True,
            )
    rows = [row for row, _ in methods]
    for row in rows:
        if row.k == "adaptive":
            fixed = next(r for r in rows if r.method == row.method and r.k == str(k))
            row.bound_alpha = fixed.alpha
    if temperature == 0.0:
        reference = reference or rows[0]  # the first block's target-only outputs
        for row in rows:
            row.identical = row.outputs == reference.outputs
    return rows


def run_bench(args) -> dict[str, Any]:
    configure_logging("warning")
    target, draft, tokenizer, pair = load_models(args)
    prompts = [
        (p, build_prompt_tokens(tokenizer, GenerationRequest(prompt=p))) for p in args.prompts
    ]
    # Warm up every code path once (lazy loading, kernels, allocator).
    for mode in ("detailed", "fast"):
        request = GenerationRequest(prompt="Hi", max_tokens=4, draft_tokens=2, mode=mode)
        list(generate(target, draft, tokenizer, request, SpeculationConfig()))
    mlx_lm_run(target, draft, tokenizer, prompts[0][1], 4, 0.0, 0, 2)

    train_data = []
    if ("trained" in args.variants and args.train_steps > 0) or args.draft_vocab > 0:
        began = time.perf_counter()
        train_prompts = list(args.train_prompts)
        if not args.heldout_training:
            # As the learning loop would after serving these requests: their target outputs
            # are part of what the draft learns from.
            train_prompts += [p for p, _ in prompts]
        train_data = target_completions(target, tokenizer, train_prompts, args.train_tokens)
        print(
            f"target completions for training: {time.perf_counter() - began:.0f}s", file=sys.stderr
        )
    vocab = None
    if args.draft_vocab > 0:
        vocab_size = int(target.model.embed_tokens.weight.shape[0])
        vocab = DraftVocab(vocab_size, args.draft_vocab, always=tuple(tokenizer.eos_token_ids))
        for seq, plen in train_data:
            vocab.observe(seq[plen:])

    result: dict[str, Any] = {"pair": pair, "k": args.k, "max_tokens": args.max_tokens,
                              "prompts": list(args.prompts), "rows": [], "costs": {},
                              "heldout_training": args.heldout_training}  # fmt: skip
    drafts = [("untrained", None)] if "untrained" in args.variants else []
    if args.train_steps > 0 and "trained" in args.variants:
        drafts.append(("trained", train_data))
    references: dict[float, Row] = {}
    for label, data in drafts:
        if data is not None:
            result["training"] = distill(
                target, draft, data, steps=args.train_steps, seconds=args.train_seconds
            )
            print(f"distillation: {result['training']}", file=sys.stderr)
        costs = measure_costs(target, draft, args.k, vocab)
        result["costs"][label] = {key: round(v, 2) for key, v in costs.items()}
        for temperature in args.temperatures:
            rows = bench_draft(
                label, target, draft, tokenizer, prompts, args, costs, vocab,
                references.get(temperature), temperature,
            )  # fmt: skip
            references.setdefault(temperature, rows[0])
            result["rows"] += rows
            if temperature > 0:
                # Along the target-only row's samples: text the target itself would produce.
                texts = [
                    (ids + out, len(ids))
                    for (_, ids), out in zip(prompts, rows[0].outputs, strict=True)
                ]
                expected = expected_acceptance(target, draft, texts, temperature)
                result.setdefault("expected_acceptance", {})[label] = expected
    return result


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def summarise(result: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    rows: list[Row] = result["rows"]
    base = {(r.temperature, r.draft): r.tps for r in rows if r.method.startswith("target-only")}
    records, lines = [], []
    lines.append(f"Pair: {result['pair']}; K = {result['k']}; {len(result['prompts'])} prompts x "
                 f"{result['max_tokens']} tokens max.")  # fmt: skip
    for label, costs in result["costs"].items():
        lines.append(
            f"Costs ({label} draft, ms): " + ", ".join(f"{k} {v}" for k, v in costs.items())
        )
    if "training" in result:
        data = (
            "other prompts only"
            if result["heldout_training"]
            else "other prompts + these prompts' target outputs"
        )
        lines.append(f"Distillation ({data}): {result['training']}")
    for label, e in result.get("expected_acceptance", {}).items():
        lines.append(
            f"Expected acceptance per proposal ({label} draft, T = {e['temperature']:g}, "
            f"{e['positions']} positions of target-only text): ours sum min(p, q) "
            f"{e['ours']:.3f}, mlx-lm sum p q {e['mlx_lm']:.3f}"
        )
    lines.append("")
    header = ("| T | draft | method | K | tok/s | speedup | acceptance | alpha | accepted/step "
              "| tok/pass | c | bound | measured/bound | identical |")  # fmt: skip
    lines += [header, "|" + "---|" * 14]
    for r in rows:
        baseline = base.get((r.temperature, r.draft))
        speedup = r.tps / baseline if baseline else None
        bound = r.bound()
        ratio = speedup / bound if speedup and bound else None
        ident = "-" if r.identical is None else ("yes" if r.identical else "NO")
        lines.append(
            f"| {r.temperature:g} | {r.draft} | {r.method} | {r.k} | {r.tps:.1f} | {_fmt(speedup)} "
            f"| {_fmt(r.acceptance)} | {_fmt(r.alpha)} | {_fmt(r.accepted_per_step)} "
            f"| {r.tokens_per_pass:.2f} | {_fmt(r.c)} "
            f"| {_fmt(bound)} | {_fmt(ratio)} | {ident} |"
        )
        record = {k: v for k, v in asdict(r).items() if k != "outputs"}
        record.update(tokens_per_second=r.tps, speedup=speedup, acceptance=r.acceptance,
                      alpha=r.alpha, accepted_per_step=r.accepted_per_step,
                      tokens_per_pass=r.tokens_per_pass, bound=bound,
                      measured_over_bound=ratio)  # fmt: skip
        records.append(record)
    return records, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default="embedded", help="model spec (default: embedded)")
    parser.add_argument("--draft", default="self:4", help="draft spec (default: self:4)")
    parser.add_argument("--prompts", type=Path, help="a file with one prompt per line")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("-k", "--k", type=int, default=4, help="fixed draft length")
    parser.add_argument("--temperatures", default="0,1", help="comma-separated")
    parser.add_argument(
        "--variants", default="untrained,trained", help="which drafts to run, comma-separated"
    )
    parser.add_argument("--train-steps", type=int, default=60, help="0 = no trained draft")
    parser.add_argument(
        "--train-seconds",
        type=float,
        default=300.0,
        help="cap on distillation time (60 steps take ~2 minutes on 2 idle cores)",
    )
    parser.add_argument(
        "--train-tokens", type=int, default=48, help="target tokens per train prompt"
    )
    parser.add_argument(
        "--heldout-training",
        action="store_true",
        help="distil only on other prompts (default: also on the bench prompts' target outputs)",
    )
    parser.add_argument(
        "--draft-vocab", type=int, default=4096, help="restricted draft head rows, 0 = skip"
    )
    parser.add_argument("--json", type=Path, help="write results here")
    parser.add_argument("--smoke", action="store_true", help="tiny models, seconds (for tests)")
    args = parser.parse_args(argv)
    args.temperatures = [float(t) for t in args.temperatures.split(",")]
    args.variants = {v.strip() for v in args.variants.split(",") if v.strip()}
    args.prompts = (
        [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
        if args.prompts else list(BENCH_PROMPTS)
    )  # fmt: skip
    args.train_prompts = list(TRAIN_PROMPTS)
    if args.smoke:
        args.prompts = args.prompts[:2]
        args.train_prompts = args.train_prompts[:4]
        args.max_tokens, args.train_tokens = min(args.max_tokens, 12), 8
        args.train_steps, args.draft_vocab = min(args.train_steps, 3), min(args.draft_vocab, 64)
    result = run_bench(args)
    records, table = summarise(result)
    print(table)
    if args.json:
        payload = {k: v for k, v in result.items() if k != "rows"}
        payload["rows"] = records
        payload["blas"] = speclora.daemon.blas.blas_info().label
        payload["attention"] = speclora.daemon.cpu_attention.attention_info().label
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
