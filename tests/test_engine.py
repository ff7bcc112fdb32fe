"""The detailed and fast engines on tiny models: lossless at T = 0, stop conditions, text
safety, summaries, caches, interleaving and early close."""

from __future__ import annotations

import copy

import mlx.core as mx
import pytest
from mlx_lm import stream_generate
from speclora.daemon.engine import (
    GenerationRequest,
    GenerationSummary,
    PrefillProgress,
    SamplingParams,
    StepEvent,
    build_prompt_tokens,
    generate,
)
from speclora.shared.config import SpeculationConfig
from test_engine_helpers import untied_loaded  # noqa: F401  (fixture)

PROMPTS = ["Hello", "Paris is the capital of", "def add(a, b):", "1 2 3", "Write a haiku"]
SPEC = SpeculationConfig()


def target_only(target, tokenizer, ids: list[int], n: int) -> list[int]:
    """mlx-lm's own greedy decoding: the reference every mode must reproduce at T = 0."""
    return [r.token for r in stream_generate(target, tokenizer, mx.array(ids), max_tokens=n)]


def run(target, draft, tokenizer, request, spec=SPEC, **kw):
    events = list(generate(target, draft, tokenizer, request, spec, **kw))
    summary = events[-1]
    assert isinstance(summary, GenerationSummary)
    assert not any(isinstance(e, GenerationSummary) for e in events[:-1])
    return events, summary


def chunks(events):
    return [e.chunk for e in events if isinstance(e, StepEvent) and e.chunk is not None]


@pytest.fixture(scope="module")
def references(untied_loaded):  # noqa: F811
    target, _, _, tokenizer = untied_loaded
    refs = {}
    for prompt in PROMPTS:
        ids = build_prompt_tokens(tokenizer, GenerationRequest(prompt=prompt))
        refs[prompt] = target_only(target, tokenizer, ids, 40)
    return refs


@pytest.mark.parametrize("draft_name", ["identical", "random", "self"])
@pytest.mark.parametrize("k", [None, 1, 2, 3, 4, 5, 6])
def test_greedy_detailed_equals_target_only(untied_loaded, references, draft_name, k):  # noqa: F811
    target, random_draft, self_draft, tokenizer = untied_loaded
    draft = {"identical": target, "random": random_draft, "self": self_draft}[draft_name]
    for prompt in PROMPTS[:3]:
        request = GenerationRequest(prompt=prompt, max_tokens=24, draft_tokens=k)
        events, summary = run(target, draft, tokenizer, request)
        assert list(summary.completion_token_ids) == references[prompt][:24]
        assert summary.finish_reason == "length"
        if draft_name == "identical" and k is not None:
            assert summary.accepted == summary.proposed > 0
        if draft_name == "random" and k is not None:
            assert summary.acceptance_rate < 0.2


@pytest.mark.parametrize("k", [0, 3])
def test_greedy_fast_equals_target_only(untied_loaded, references, k):  # noqa: F811
    target, _, self_draft, tokenizer = untied_loaded
    for prompt in PROMPTS:
        request = GenerationRequest(prompt=prompt, max_tokens=40, draft_tokens=k, mode="fast")
        events, summary = run(target, self_draft, tokenizer, request)
        assert list(summary.completion_token_ids) == references[prompt]
        assert summary.mode == "fast"
        assert summary.accepted == sum(summary.from_draft)
        assert (summary.proposed > 0) == (k > 0)


def test_plain_decoding_without_draft(untied_loaded, references):  # noqa: F811
    target, _, _, tokenizer = untied_loaded
    request = GenerationRequest(prompt=PROMPTS[1], max_tokens=40)
    _, summary = run(target, None, tokenizer, request)
    assert list(summary.completion_token_ids) == references[PROMPTS[1]]
    assert summary.proposed == 0 and summary.target_passes == 40


def test_eos_mid_draft_stops_exactly_there(untied_loaded, references):  # noqa: F811
    target, _, _, tokenizer = untied_loaded
    ref = references[PROMPTS[0]]
    eos_at = next(i for i in range(6, 40) if ref[i] not in ref[:i])  # a token's first use
    tok = copy.copy(tokenizer)
    tok.eos_token_ids = {ref[eos_at]}
    # The identical draft accepts all K = 4, so steps span tokens 0-4, 5-9, ...: EOS falls
    # inside a step and the tokens after it must be dropped.
    for mode in ("detailed", "fast"):
        request = GenerationRequest(prompt=PROMPTS[0], max_tokens=40, draft_tokens=4, mode=mode)
        events, summary = run(target, target, tok, request)
        assert summary.finish_reason == "eos"
        assert list(summary.completion_token_ids) == ref[: eos_at + 1]
        text = "".join(c.text for c in chunks(events))
        assert text == tokenizer.decode(ref[:eos_at])


def test_stop_string_mid_draft_is_never_emitted(untied_loaded, references):  # noqa: F811
    target, _, _, tokenizer = untied_loaded
    ref = references[PROMPTS[2]]
    full = tokenizer.decode(ref)
    start = next(
        i
        for i in range(12, len(full))
        if full[i : i + 3].isascii() and full[i : i + 3].isprintable()
    )
    stop = full[start : start + 3]
    cut = full.find(stop)
    assert cut > 0
    for mode in ("detailed", "fast"):
        for draft in (target, None):
            request = GenerationRequest(
                prompt=PROMPTS[2], max_tokens=40, draft_tokens=4, stop=(stop,), mode=mode
            )
            events, summary = run(target, draft, tokenizer, request)
            text = "".join(c.text for c in chunks(events))
            assert summary.finish_reason == "stop_string"
            assert text == full[:cut]
            # Ids end with the token that completed the stop string.
            ids = list(summary.completion_token_ids)
            assert ids == ref[: len(ids)]
            assert stop in tokenizer.decode(ids) and stop not in tokenizer.decode(ids[:-1])


def test_stop_string_prefix_is_held_back_then_released(untied_loaded, references):  # noqa: F811
    target, _, _, tokenizer = untied_loaded
    full = tokenizer.decode(references[PROMPTS[3]])
    stop = full[10:14] + "\u2603never"  # its prefix occurs, the whole never does
    request = GenerationRequest(prompt=PROMPTS[3], max_tokens=40, draft_tokens=2, stop=(stop,))
    events, summary = run(target, target, tokenizer, request)
    parts = [c.text for c in chunks(events)]
    assert "".join(parts) == full
    assert summary.finish_reason == "length"
    # While the prefix was pending the text stopped before it.
    emitted = ""
    for part in parts[:-1]:
        emitted += part
        assert not emitted.endswith(full[10:14]) or emitted == full[:14] and False


def test_chunks_concatenate_to_the_summary(untied_loaded):  # noqa: F811
    target, _, self_draft, tokenizer = untied_loaded
    request = GenerationRequest(
        prompt=PROMPTS[4], max_tokens=33, draft_tokens=3, sampling=SamplingParams(1.0, seed=5)
    )
    events, summary = run(target, self_draft, tokenizer, request)
    parts = chunks(events)
    ids = [t for c in parts for t in c.token_ids]
    assert ids == list(summary.completion_token_ids)
    assert [f for c in parts for f in c.from_draft] == list(summary.from_draft)
    assert "".join(c.text for c in parts) == tokenizer.decode(ids)
    assert summary.completion_tokens == 33 and summary.finish_reason == "length"
    assert list(summary.prompt_token_ids) == build_prompt_tokens(tokenizer, request)
    assert summary.accepted == sum(summary.from_draft)
    traces = [e.trace for e in events if isinstance(e, StepEvent)]
    assert sum(t.k for t in traces) == summary.proposed
    assert len(traces) == summary.target_passes
    rejections = [i for i in summary.rejection_positions]
    assert len(rejections) == sum(1 for t in traces if t.first_rejection is not None)
    for t in traces:
        assert len(t.draft_probs) == len(t.target_probs) == len(t.proposed) == t.k
        assert list(t.emitted[: t.accepted]) == list(t.proposed[: t.accepted])
    assert summary.sampling == request.sampling
    assert summary.time_to_first_token_s <= summary.total_time_s


def test_utf8_never_split(untied_loaded):  # noqa: F811
    """Feed the tracker the tokens of multi-byte text one at a time: no replacement chars."""
    from speclora.daemon.engine.output import CompletionTracker

    _, _, _, tokenizer = untied_loaded
    text = "café naïve — “quotes” 🙂 漢字 かな"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text) // 2  # byte-level pieces, some split characters
    tracker = CompletionTracker(tokenizer, GenerationRequest(prompt="x", max_tokens=999), [1])
    out = []
    for t in ids:
        chunk = tracker.add([t])
        if chunk:
            assert "\ufffd" not in chunk.text
            out.append(chunk.text)
    final = tracker.finish("length")
    out.append(final.text if final else "")
    assert "".join(out) == text


def test_chunked_prefill_reports_progress_and_stays_exact(untied_loaded):  # noqa: F811
    target, _, self_draft, tokenizer = untied_loaded
    prompt = "The quick brown fox jumps over the lazy dog. " * 6
    ids = build_prompt_tokens(tokenizer, GenerationRequest(prompt=prompt))
    ref = target_only(target, tokenizer, ids, 20)
    spec = SpeculationConfig(prefill_chunk=16)
    request = GenerationRequest(prompt=prompt, max_tokens=20, draft_tokens=3)
    events, summary = run(target, self_draft, tokenizer, request, spec)
    progress = [e for e in events if isinstance(e, PrefillProgress)]
    assert len(progress) == -(-(len(ids) - 1) // 16)
    assert progress[-1].done == progress[-1].total == len(ids)
    assert [p.done for p in progress] == sorted(p.done for p in progress)
    assert list(summary.completion_token_ids) == ref


def _drive(gens):
    """Advance several generations round-robin, one event each, like the worker does."""
    results = [None] * len(gens)
    active = dict(enumerate(gens))
    while active:
        for i, gen in list(active.items()):
            event = next(gen)
            if isinstance(event, GenerationSummary):
                results[i] = event
                del active[i]
    return results


def test_interleaved_generations_match_running_alone(untied_loaded):  # noqa: F811
    target, random_draft, self_draft, tokenizer = untied_loaded
    requests = [
        GenerationRequest(prompt=PROMPTS[0], max_tokens=30, draft_tokens=None),
        GenerationRequest(
            prompt=PROMPTS[1], max_tokens=25, draft_tokens=3, sampling=SamplingParams(1.0, seed=1)
        ),
        GenerationRequest(
            prompt=PROMPTS[2], max_tokens=20, mode="fast", sampling=SamplingParams(0.8, seed=2)
        ),
    ]
    alone = [run(target, self_draft, tokenizer, r)[1] for r in requests]
    together = _drive([generate(target, self_draft, tokenizer, r, SPEC) for r in requests])
    for a, b in zip(alone, together, strict=True):
        assert a.completion_token_ids == b.completion_token_ids


def test_seeded_sampling_is_reproducible_and_seeds_differ(untied_loaded):  # noqa: F811
    target, _, self_draft, tokenizer = untied_loaded
    outs = {}
    for mode in ("detailed", "fast"):
        for seed in (1, 1, 2):
            request = GenerationRequest(
                prompt=PROMPTS[4], max_tokens=30, mode=mode, sampling=SamplingParams(1.0, seed=seed)
            )
            outs.setdefault((mode, seed), set()).add(
                run(target, self_draft, tokenizer, request)[1].completion_token_ids
            )
        assert len(outs[(mode, 1)]) == 1
        assert outs[(mode, 1)] != outs[(mode, 2)]


def test_cancel_returns_a_summary_and_releases_caches(untied_loaded, monkeypatch):  # noqa: F811
    import speclora.daemon.engine.speculative as speculative

    made = []
    real = speculative.make_prompt_cache

    def recording(model, *a, **kw):
        cache = real(model, *a, **kw)
        made.append(cache)
        return cache

    monkeypatch.setattr(speculative, "make_prompt_cache", recording)
    target, _, self_draft, tokenizer = untied_loaded
    request = GenerationRequest(prompt=PROMPTS[0], max_tokens=40, draft_tokens=2)
    gen = generate(target, self_draft, tokenizer, request, SPEC)
    steps = [next(gen) for _ in range(3)]
    assert made and all(len(c) > 0 for c in made)
    summary = gen.cancel()
    assert summary.finish_reason == "cancelled"
    emitted = sum(len(s.trace.emitted) for s in steps if isinstance(s, StepEvent))
    assert 0 < summary.completion_tokens == emitted
    assert all(len(c) == 0 for c in made)  # caches dropped in the engine's finally
    with pytest.raises(StopIteration):
        next(gen)
    # Closing in the middle of prefill is fine too, and the engine keeps working.
    spec = SpeculationConfig(prefill_chunk=16)
    long = GenerationRequest(prompt="word " * 80, max_tokens=5)
    gen = generate(target, self_draft, tokenizer, long, spec)
    assert isinstance(next(gen), PrefillProgress)
    gen.close()
    assert run(target, self_draft, tokenizer, request)[1].completion_tokens == 40


def test_fast_mode_close_early(untied_loaded):  # noqa: F811
    target, _, self_draft, tokenizer = untied_loaded
    request = GenerationRequest(prompt=PROMPTS[0], max_tokens=40, draft_tokens=2, mode="fast")
    gen = generate(target, self_draft, tokenizer, request, SPEC)
    steps = 0
    while steps < 5:  # prefill events first, then one event per token
        steps += isinstance(next(gen), StepEvent)
    summary = gen.cancel()
    assert summary.finish_reason == "cancelled" and summary.completion_tokens == 5


@pytest.mark.parametrize("max_tokens", [1, 2, 7])
def test_max_tokens_is_exact(untied_loaded, references, max_tokens):  # noqa: F811
    target, _, _, tokenizer = untied_loaded
    for mode in ("detailed", "fast"):
        request = GenerationRequest(
            prompt=PROMPTS[0], max_tokens=max_tokens, draft_tokens=4, mode=mode
        )
        _, summary = run(target, target, tokenizer, request)
        assert list(summary.completion_token_ids) == references[PROMPTS[0]][:max_tokens]
        assert summary.finish_reason == "length"
