"""Which lever lifts a learned draft's acceptance on unseen prompts? (issue #20, point 3)

The learning bench's self-draft reaches ~0.33 teacher-forced greedy agreement on held-out
prompts of its trained domain, whatever LoRA's settings. This bench asks why, offline and
cheaply: the target writes greedy continuations of the learning bench's prompts (train topics,
held-out topics, unrelated prompts); the draft's last hidden state and the target's are computed
once per position; then only a small map is trained on top, each lever in turn, and every lever
is scored the way the trainer's gate scores an adapter (argmax agreement with the target, per
position, teacher-forced), on the train positions, the held-out ones and the unrelated ones.

The levers (each a zero-initialised residual on the draft's pre-norm hidden state h_t, so an
untrained map is today's draft exactly):
- `none`: the draft as it is;
- `hidden map`: h_t + W h_t (a trainable full-rank map in front of the head: "a trainable
  draft head");
- `target feature`: h_t + W f_{t-1}, with f the target's normed last hidden state at the
  previous position, which every verify pass computes (EAGLE, arXiv 2401.15077). Its agreement
  with a staler feature (f_{t-2}, f_{t-3}: a draft's second and third proposals) is reported too;
- `both`: h_t + W h_t + V f_{t-1};
- `mlp`: h_t + V f_{t-1} + B silu(A [h_t; f_{t-1}]) (more capacity).
Then the data: the hidden map trained on a quarter, a half and all of the train prompts, and, with
`--samples N`, with N extra continuations of each train prompt sampled at T = 0.8 (DistillSpec,
arXiv 2310.08461: on-policy data the target can write while the daemon is idle).

Prints a markdown table, writes JSON with `--json`. `--smoke`: tiny random models, seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import speclora.daemon.blas  # noqa: F401  (OpenBLAS before mlx)

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from learning import DOMAIN_TEMPLATES, DOMAIN_TOPICS, UNRELATED  # noqa: E402
from mlx_lm import stream_generate  # noqa: E402
from mlx_lm.models.base import create_attention_mask  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402
from speclora.daemon.engine import GenerationRequest, build_prompt_tokens  # noqa: E402
from speclora.daemon.engine.draft_vocab import model_parts  # noqa: E402
from speclora.daemon.learning import toy  # noqa: E402
from speclora.shared.logging import configure_logging  # noqa: E402
from speculative import load_models  # noqa: E402

LEVERS = ("none", "hidden map", "target feature", "both", "mlp")
Case = tuple[list[int], list[int]]  # (prompt ids, completion ids)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prompt_sets(args: argparse.Namespace) -> dict[str, list[str]]:
    """The learning bench's split: held-out topics are never trained on, in any phrasing."""
    if args.smoke:
        return {
            "train": toy.domain_prompts(args.train_prompts, seed=1),
            "heldout": toy.domain_prompts(args.heldout_prompts, seed=2),
            "unrelated": toy.unrelated_prompts(args.unrelated_prompts),
        }
    held_topics = DOMAIN_TOPICS[::8][: args.heldout_prompts]
    train = [t.format(x) for t in DOMAIN_TEMPLATES for x in DOMAIN_TOPICS if x not in held_topics][
        : args.train_prompts
    ]
    return {
        "train": train,
        "heldout": [DOMAIN_TEMPLATES[0].format(t) for t in held_topics],
        "unrelated": list(UNRELATED[: args.unrelated_prompts]),
    }


def continue_prompts(
    target, tokenizer, prompts: Sequence[list[int]], max_tokens: int, temperature: float
) -> list[Case]:
    sampler = make_sampler(temp=temperature, top_p=0.95) if temperature > 0 else None
    cases = []
    for ids in prompts:
        completion: list[int] = []
        for r in stream_generate(
            target, tokenizer, mx.array(ids), max_tokens=max_tokens, sampler=sampler
        ):
            completion.append(r.token)
            if r.token in tokenizer.eos_token_ids:
                break
        cases.append((list(ids), completion))
    return cases


class Features:
    """Per completion position t (the one that predicts token t + 1): the draft's pre-norm last
    hidden state, the target's normed last hidden state at t - 1, t - 2 and t - 3, and the
    target's greedy token. `ends[i]`: the positions of cases[: i + 1]."""

    FIELDS = ("hidden", "f1", "f2", "f3", "greedy")

    def __init__(self, target, draft, cases: Sequence[Case]):
        parts = [self._case(target, draft, p, c) if len(c) >= 2 else None for p, c in cases]
        self.ends = np.cumsum([0 if x is None else int(x[-1].shape[0]) for x in parts]).tolist()
        kept = [x for x in parts if x is not None]
        cols = list(zip(*kept, strict=True)) if kept else [[] for _ in self.FIELDS]
        self.hidden, self.f1, self.f2, self.f3, self.greedy = (mx.concatenate(c) for c in cols)

    @staticmethod
    def _case(target, draft, prompt: list[int], completion: list[int]) -> tuple[mx.array, ...]:
        seq = mx.array(prompt + completion)[None]
        feature = target.model(seq)[0]  # the target's normed last hidden state
        greedy = mx.argmax(model_parts(target).head(feature), axis=-1)
        h = draft.model.embed_tokens(seq)
        mask = create_attention_mask(h, None)
        for layer in draft.model.layers:
            h = layer(h, mask, None)
        start = max(len(prompt) - 1, 3)
        pos = mx.arange(start, len(prompt) + len(completion) - 1)
        out = (h[0][pos], feature[pos - 1], feature[pos - 2], feature[pos - 3], greedy[pos])
        mx.eval(out)
        return out

    def __len__(self) -> int:
        return int(self.greedy.shape[0])

    def first_cases(self, k: int) -> Features:
        out = object.__new__(Features)
        n = self.ends[k - 1] if k else 0
        out.ends = self.ends[:k]
        for name in self.FIELDS:
            setattr(out, name, getattr(self, name)[:n])
        return out

    def plus(self, other: Features) -> Features:
        out = object.__new__(Features)
        out.ends = self.ends + [self.ends[-1] + e for e in other.ends] if self.ends else other.ends
        for name in self.FIELDS:
            setattr(out, name, mx.concatenate([getattr(self, name), getattr(other, name)]))
        return out


class Lever(nn.Module):
    """A zero-initialised residual on the draft's hidden state (see the module docstring)."""

    def __init__(self, kind: str, dim: int, width: int = 1024):
        super().__init__()
        self.kind = kind
        if kind in ("hidden map", "both"):
            self.w = nn.Linear(dim, dim, bias=False)
            self.w.weight = mx.zeros((dim, dim))
        if kind in ("target feature", "both", "mlp"):
            self.v = nn.Linear(dim, dim, bias=False)
            self.v.weight = mx.zeros((dim, dim))
        if kind == "mlp":
            self.a = nn.Linear(2 * dim, width)
            self.b = nn.Linear(width, dim, bias=False)
            self.b.weight = mx.zeros((dim, width))

    def __call__(self, h: mx.array, f: mx.array) -> mx.array:
        out = h
        if "w" in self:
            out = out + self.w(h)
        if "v" in self:
            out = out + self.v(f)
        if "a" in self:
            out = out + self.b(nn.silu(self.a(mx.concatenate([h, f], axis=-1))))
        return out


class Scorer:
    def __init__(self, draft):
        self.norm = draft.model.norm
        self.parts = model_parts(draft)

    def logits(self, lever: Lever, h: mx.array, f: mx.array) -> mx.array:
        return self.parts.head(self.norm(lever(h, f)))

    def agreement(self, lever: Lever, data: Features, lag: int = 1) -> float:
        if not len(data):
            return 0.0
        feature = {1: data.f1, 2: data.f2, 3: data.f3}[lag]
        hits = []
        for i in range(0, len(data), 512):
            logits = self.logits(lever, data.hidden[i : i + 512], feature[i : i + 512])
            hits.append(mx.argmax(logits, axis=-1) == data.greedy[i : i + 512])
        return mx.concatenate(hits).astype(mx.float32).mean().item()


def train(
    scorer: Scorer, kind: str, data: Features, dim: int, epochs: int, lr: float, seed: int = 0
) -> Lever:
    lever = Lever(kind, dim)
    mx.eval(lever.parameters())
    if kind == "none" or not len(data):
        return lever
    opt = optim.AdamW(learning_rate=lr, weight_decay=0.01)

    def loss(model: Lever, h: mx.array, f: mx.array, y: mx.array) -> mx.array:
        return nn.losses.cross_entropy(scorer.logits(model, h, f), y).mean()

    step = nn.value_and_grad(lever, loss)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = mx.array(rng.permutation(len(data)))
        for i in range(0, len(data), 256):
            idx = order[i : i + 256]
            _, grads = step(lever, data.hidden[idx], data.f1[idx], data.greedy[idx])
            opt.update(lever, grads)
            mx.eval(lever.parameters(), opt.state)
    return lever


def run(args: argparse.Namespace) -> dict[str, Any]:
    target, draft, tokenizer, pair = load_models(args)
    sets = prompt_sets(args)
    ids = {
        name: [
            build_prompt_tokens(tokenizer, GenerationRequest(prompt=p, max_tokens=args.max_tokens))
            for p in prompts
        ]
        for name, prompts in sets.items()
    }
    start = time.perf_counter()
    cases = {
        name: continue_prompts(target, tokenizer, prompts, args.max_tokens, 0.0)
        for name, prompts in ids.items()
    }
    sampled = [
        case
        for _ in range(args.samples)
        for case in continue_prompts(target, tokenizer, ids["train"], args.max_tokens, 0.8)
    ]
    log(f"{pair}: continuations in {time.perf_counter() - start:.0f} s")
    feats = {name: Features(target, draft, c) for name, c in cases.items()}
    dim = int(feats["train"].hidden.shape[-1])
    scorer = Scorer(draft)
    rows: list[dict[str, Any]] = []

    def score(label: str, kind: str, data: Features, stale: bool = False) -> None:
        lever = train(scorer, kind, data, dim, args.epochs, args.lr)
        row = {"lever": label, "kind": kind, "train_positions": len(data)}
        for name in ("train", "heldout", "unrelated"):
            row[name] = scorer.agreement(lever, feats[name])
        if stale:
            row["heldout_lag2"] = scorer.agreement(lever, feats["heldout"], 2)
            row["heldout_lag3"] = scorer.agreement(lever, feats["heldout"], 3)
        rows.append(row)
        log(f"  {label}: held-out {row['heldout']:.3f}")

    for kind in LEVERS:
        score(kind, kind, feats["train"], stale=kind in ("target feature", "both", "mlp"))
    # Data: the hidden map on a quarter and a half of the train prompts, then with samples.
    n = len(cases["train"])
    for share in (4, 2):
        k = max(n // share, 1)
        score(f"hidden map, {k} of {n} train prompts", "hidden map",
              feats["train"].first_cases(k))  # fmt: skip
    if sampled:
        more = feats["train"].plus(Features(target, draft, sampled))
        score(f"hidden map, + {args.samples} samples at T = 0.8 per train prompt", "hidden map",
              more)  # fmt: skip
    return {
        "pair": pair,
        "prompts": {k: len(v) for k, v in sets.items()},
        "positions": {k: len(v) for k, v in feats.items()},
        "max_tokens": args.max_tokens,
        "epochs": args.epochs,
        "samples": args.samples,
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Draft levers on {result['pair']}: teacher-forced greedy agreement with the target "
        f"(positions: {result['positions']}), each map trained {result['epochs']} epochs.\n",
        "| lever | train positions | train | held-out | unrelated | held-out, 2nd / 3rd proposal |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        stale = f"{r['heldout_lag2']:.3f} / {r['heldout_lag3']:.3f}" if "heldout_lag2" in r else "-"
        lines.append(
            f"| {r['lever']} | {r['train_positions']} | {r['train']:.3f} | {r['heldout']:.3f} | "
            f"{r['unrelated']:.3f} | {stale} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="embedded")
    parser.add_argument("--draft", default="self:4")
    parser.add_argument("--train-prompts", type=int, default=64)
    parser.add_argument("--heldout-prompts", type=int, default=8)
    parser.add_argument("--unrelated-prompts", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument(
        "--samples", type=int, default=0, help="T = 0.8 continuations per train prompt"
    )
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny random models, seconds")
    args = parser.parse_args(argv)
    configure_logging("warning")
    if args.smoke:
        args.train_prompts, args.heldout_prompts, args.unrelated_prompts = 4, 2, 2
        args.max_tokens, args.epochs, args.samples = 12, 1, min(args.samples, 1)
    result = run(args)
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
