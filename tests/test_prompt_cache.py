"""The prompt cache: a request that starts with a finished request's tokens (a chat's next turn)
prefills only the rest, and its output is exactly what a fresh prefill gives."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache, make_prompt_cache
from speclora.daemon.engine import (
    ChatTurn,
    GenerationRequest,
    GenerationSummary,
    PromptCache,
    SamplingParams,
    StepEvent,
    build_prompt_tokens,
    generate,
)
from speclora.daemon.engine.speculative import _Decoder
from speclora.daemon.state import ModelHub
from speclora.daemon.worker import engine_generate
from speclora.shared.config import SpeculationConfig
from test_engine_helpers import unshared_copy, untied_loaded  # noqa: F401  (fixture)

SPEC = SpeculationConfig(prefill_chunk=16)
FIRST = ChatTurn("user", "Tell me about the sea and its long slow tides, please")


def _run(target, draft, tokenizer, request, cache=None, tag="") -> GenerationSummary:
    return _events(target, draft, tokenizer, request, cache, tag)[-1]


def _events(target, draft, tokenizer, request, cache=None, tag="") -> list:
    return list(
        generate(target, draft, tokenizer, request, SPEC, prompt_cache=cache, draft_tag=tag)
    )


def _assert_same_proposals(events, reference) -> None:
    """Each step's proposals, and the draft's probabilities of them, which any error in its
    cache would move (not bit for bit: another path to the same numbers may differ by an ulp)."""
    steps, ref = ([e.trace for e in ev if isinstance(e, StepEvent)] for ev in (events, reference))
    assert [t.proposed for t in steps] == [t.proposed for t in ref]
    probs = [q for t in steps for q in t.draft_probs]
    assert np.allclose(probs, [q for t in ref for q in t.draft_probs], rtol=1e-4, atol=1e-6)


def _pick(untied_loaded, name):  # noqa: F811
    target, random_draft, self_draft, _ = untied_loaded
    return {
        "none": None,
        "self (shares the target's cache)": self_draft,
        "self copy (its own cache)": unshared_copy(self_draft),
        "random": random_draft,
    }[name]


@pytest.mark.parametrize(
    "draft_name",
    ["none", "self (shares the target's cache)", "self copy (its own cache)", "random"],
)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_next_chat_turn_reuses_the_cache_and_matches_a_fresh_prefill(
    untied_loaded,  # noqa: F811
    draft_name,
    temperature,
):
    target, _, _, tokenizer = untied_loaded
    draft = _pick(untied_loaded, draft_name)
    cache = PromptCache(max_entries=4, max_bytes=1 << 30)
    sampling = SamplingParams(temperature, seed=11)
    turn1 = GenerationRequest(messages=(FIRST,), max_tokens=20, sampling=sampling)
    first = _run(target, draft, tokenizer, turn1, cache)
    assert first.cached_prompt_tokens == 0
    assert cache.stats().entries == 1

    reply = tokenizer.decode(list(first.completion_token_ids))
    turn2 = GenerationRequest(
        messages=(FIRST, ChatTurn("assistant", reply), ChatTurn("user", "And the moon?")),
        max_tokens=24,
        sampling=sampling,
    )
    second_events = _events(target, draft, tokenizer, turn2, cache)
    fresh_events = _events(target, draft, tokenizer, turn2)
    second, fresh = second_events[-1], fresh_events[-1]
    # Most of turn 2's prompt is turn 1's prompt and reply: only the rest is prefilled.
    assert second.cached_prompt_tokens >= first.prompt_tokens
    assert second.cached_prompt_tokens < second.prompt_tokens
    assert second.completion_token_ids == fresh.completion_token_ids
    # The draft proposes what it would after a fresh prefill: its reused cache is exact too.
    _assert_same_proposals(second_events, fresh_events)
    stats = cache.stats()
    assert stats.hits == 1
    # A draft with a cache of its own gets it back; the others have none to store.
    own_cache = draft_name in ("self copy (its own cache)", "random")
    assert (stats.draft_tokens_reused > 0) == own_cache


def test_a_draft_cache_is_not_reused_under_other_weights(untied_loaded):  # noqa: F811
    """After an adapter swap (a new draft tag) the draft prefills again; the target's cache is
    still reused, and the proposals are those of a fresh run."""
    target, _, self_draft, tokenizer = untied_loaded
    draft = unshared_copy(self_draft)
    cache = PromptCache(max_entries=4, max_bytes=1 << 30)
    turn1 = GenerationRequest(messages=(FIRST,), max_tokens=12, draft_tokens=2)
    first = _run(target, draft, tokenizer, turn1, cache, tag="v1")
    turn2 = GenerationRequest(
        messages=(
            FIRST,
            ChatTurn("assistant", tokenizer.decode(list(first.completion_token_ids))),
            ChatTurn("user", "More?"),
        ),
        max_tokens=12,
        draft_tokens=2,
    )
    events = _events(target, draft, tokenizer, turn2, cache, tag="v2")
    assert events[-1].cached_prompt_tokens > 0
    assert cache.stats().draft_tokens_reused == 0
    _assert_same_proposals(events, _events(target, draft, tokenizer, turn2))


def test_a_repeated_prompt_prefills_nothing_and_stays_exact(untied_loaded):  # noqa: F811
    target, _, self_draft, tokenizer = untied_loaded
    cache = PromptCache(max_entries=4, max_bytes=1 << 30)
    request = GenerationRequest(prompt="The same question again and again", max_tokens=16)
    first = _run(target, self_draft, tokenizer, request, cache)
    again = _run(target, self_draft, tokenizer, request, cache)
    assert again.cached_prompt_tokens == again.prompt_tokens - 1  # all but the step's input
    assert again.completion_token_ids == first.completion_token_ids
    assert cache.stats().entries == 1  # the same tokens again: one entry, not two


def _assert_entry_is_exact(cache: PromptCache, target, tokens: list[int]) -> int:
    """A fetch for `tokens` gives the same last logits as a fresh prefill; returns n reused."""
    reused = cache.fetch(target, tokens)
    assert reused is not None
    n = reused.n
    assert 0 < n < len(tokens)
    cached = target(mx.array([tokens[n:]]), cache=reused.cache)[0, -1]
    fresh = target(mx.array([tokens]), cache=make_prompt_cache(target))[0, -1]
    assert mx.allclose(cached, fresh, atol=1e-4).item()
    return n


def test_a_fetched_cache_gives_a_fresh_prefills_logits(untied_loaded):  # noqa: F811
    target, _, _, tokenizer = untied_loaded
    cache = PromptCache(max_entries=4, max_bytes=1 << 30)
    request = GenerationRequest(prompt="Caches must not drift from a fresh prefill", max_tokens=12)
    done = _run(target, None, tokenizer, request, cache)
    held = list(done.prompt_token_ids) + list(done.completion_token_ids)[:-1]  # the entry's
    # Sharing a part of the entry: a trimmed copy, and the entry stays for others.
    assert _assert_entry_is_exact(cache, target, held[:-4] + [5, 9]) == len(held) - 4
    assert cache.stats().entries == 1
    # Extending it (a chat's next turn): the entry itself is handed over, no second copy.
    assert _assert_entry_is_exact(cache, target, held + [5, 9, 2]) == len(held)
    assert cache.stats().entries == 0


def test_concurrent_requests_get_private_copies(untied_loaded):  # noqa: F811
    target, _, self_draft, tokenizer = untied_loaded
    cache = PromptCache(max_entries=4, max_bytes=1 << 30)
    base = GenerationRequest(prompt="Shared opening words for both requests", max_tokens=8)
    _run(target, self_draft, tokenizer, base, cache)
    a = GenerationRequest(prompt=base.prompt + " and then one way", max_tokens=16)
    b = GenerationRequest(prompt=base.prompt + " but another way", max_tokens=16)
    gens = [generate(target, self_draft, tokenizer, r, SPEC, prompt_cache=cache) for r in (a, b)]
    results: list[list[object]] = [[], []]
    live = [iter(g) for g in gens]
    while any(g is not None for g in live):  # interleave steps as the worker does
        for i, g in enumerate(live):
            if g is None:
                continue
            try:
                results[i].append(next(g))
            except StopIteration:
                live[i] = None
    for request, events in zip((a, b), results, strict=True):
        assert events[-1].cached_prompt_tokens > 0
        fresh = _run(target, self_draft, tokenizer, request)
        assert events[-1].completion_token_ids == fresh.completion_token_ids


def test_a_cancelled_generation_leaves_a_usable_entry(untied_loaded):  # noqa: F811
    target, _, self_draft, tokenizer = untied_loaded
    cache = PromptCache(max_entries=4, max_bytes=1 << 30)
    request = GenerationRequest(prompt="Stop me after a few steps", max_tokens=40, draft_tokens=0)
    gen = iter(generate(target, self_draft, tokenizer, request, SPEC, prompt_cache=cache))
    steps = 0
    for event in gen:  # plain steps are pipelined: one queued pass is pending when it closes
        steps += isinstance(event, StepEvent)
        if steps == 5:
            break
    gen.close()
    assert cache.stats().entries == 1
    _assert_entry_is_exact(cache, target, build_prompt_tokens(tokenizer, request) + [7, 3])
    again = _run(target, self_draft, tokenizer, request, cache)
    assert again.cached_prompt_tokens == again.prompt_tokens - 1
    assert (
        again.completion_token_ids
        == _run(target, self_draft, tokenizer, request).completion_token_ids
    )


def test_an_engine_error_stores_nothing(untied_loaded, monkeypatch):  # noqa: F811
    target, _, self_draft, tokenizer = untied_loaded
    cache = PromptCache(max_entries=4, max_bytes=1 << 30)

    def broken(self, k):
        raise RuntimeError("verify pass failed")

    monkeypatch.setattr(_Decoder, "speculative_step", broken)
    request = GenerationRequest(prompt="This one fails", max_tokens=8, draft_tokens=3)
    with pytest.raises(RuntimeError):
        _run(target, self_draft, tokenizer, request, cache)
    assert cache.stats().entries == 0  # its cache may be half-written: never reused


def test_off_when_no_entries_are_allowed(untied_loaded):  # noqa: F811
    target, _, self_draft, tokenizer = untied_loaded
    cache = PromptCache(max_entries=0, max_bytes=1 << 30)
    request = GenerationRequest(prompt="Nothing is kept", max_tokens=6)
    _run(target, self_draft, tokenizer, request, cache)
    assert _run(target, self_draft, tokenizer, request, cache).cached_prompt_tokens == 0
    assert cache.stats().entries == 0


def test_the_daemons_engine_remembers_prompts_and_acceptance(untied_loaded):  # noqa: F811
    """The worker's engine binding keeps a prompt cache and, per adapter version, the draft's
    acceptance: a second request reuses the first one's prompt, and a useless draft opens it
    with a one-token probe instead of a K = adaptive_start step."""
    target, random_draft, _, tokenizer = untied_loaded
    hub = ModelHub(target, random_draft, tokenizer, "t", "d", prompt_cache=PromptCache(4, 1 << 30))
    run = engine_generate(SpeculationConfig())
    request = GenerationRequest(prompt="Write a haiku about tides", max_tokens=24)
    prompt = build_prompt_tokens(tokenizer, request)
    first = list(run(hub, request, prompt))
    again = list(run(hub, request, prompt))
    assert [e.trace.k for e in first if isinstance(e, StepEvent)][
        0
    ] == SpeculationConfig().adaptive_start
    assert [e.trace.k for e in again if isinstance(e, StepEvent)][:2] == [1, 0]
    assert again[-1].cached_prompt_tokens == len(prompt) - 1
    assert again[-1].completion_token_ids == first[-1].completion_token_ids
    # Another adapter version starts from its own (empty) memory.
    hub.adapter_version = "v1"
    third = list(run(hub, request, prompt))
    assert [e.trace.k for e in third if isinstance(e, StepEvent)][
        0
    ] == SpeculationConfig().adaptive_start


def _reused(reused) -> int:
    return reused.n if reused else 0


def _kv(tokens: int) -> list[KVCache]:
    """One layer's cache holding `tokens` positions of 1 head x 4 dims (64 bytes each, k + v)."""
    cache = KVCache()
    cache.update_and_fetch(mx.zeros((1, 1, tokens, 4)), mx.zeros((1, 1, tokens, 4)))
    return [cache]


def test_least_recently_used_goes_first_within_the_entry_and_byte_caps():
    model = object()
    store = PromptCache(max_entries=2, max_bytes=1 << 30)
    store.insert(model, [1, 2, 3], _kv(3))
    store.insert(model, [4, 5, 6], _kv(3))
    assert (
        _reused(store.fetch(model, [1, 2, 9, 9])) == 2
    )  # a copy: [1, 2, 3] stays, now most recent
    store.insert(model, [7, 8, 9], _kv(3))  # a third entry: [4, 5, 6] was used least recently
    assert _reused(store.fetch(model, [4, 5, 6, 0])) == 0
    assert _reused(store.fetch(model, [1, 2, 9, 9])) == 2
    # An entry that extends another replaces it.
    store.insert(model, [7, 8, 9, 10, 11], _kv(5))
    assert store.stats().entries == 2
    # Another model's caches are never handed out.
    assert _reused(store.fetch(object(), [7, 8, 9, 10, 11, 12])) == 0
    # The byte cap: each of these holds 256 allocated positions (mlx-lm grows caches by 256).
    per_entry = _kv(1)[0].nbytes
    small = PromptCache(max_entries=10, max_bytes=2 * per_entry)
    for first in range(3):
        small.insert(model, [first, 1, 2], _kv(3))
    assert small.stats().entries == 2 and small.stats().bytes == 2 * per_entry
    assert _reused(small.fetch(model, [0, 1, 2, 3])) == 0  # the oldest went
