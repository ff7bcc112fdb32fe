"""Engine parts on their own: cache rewind, the adaptive K controller, the restricted draft
head and prompt building."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
from speclora.daemon.engine import (
    AdaptiveK,
    ChatTurn,
    DraftVocab,
    GenerationRequest,
    SamplingParams,
    StepEvent,
    build_prompt_tokens,
    generate,
    speedup_bound,
)
from speclora.daemon.engine.adaptive import linear_step_costs, measure_step_costs
from speclora.daemon.engine.batch import run_alone
from speclora.daemon.engine.draft_vocab import DraftHead, model_parts
from speclora.daemon.engine.speculative import _Decoder
from speclora.daemon.errors import InvalidRequestError
from speclora.daemon.state import ModelHub
from speclora.shared.config import SpeculationConfig
from test_engine_helpers import unshared_copy, untied_loaded  # noqa: F401  (fixture)

# ---------------------------------------------------------------------------- caches


def _fresh_last_logits(model, tokens: list[int]) -> mx.array:
    cache = make_prompt_cache(model)
    return model(mx.array([tokens]), cache=cache)[0, -1]


def _cached_last_logits(model, cache, tokens: list[int]) -> mx.array:
    return model(mx.array([tokens]), cache=cache)[0, -1]


@pytest.mark.parametrize(
    ("draft_name", "temperature", "k"),
    [
        ("random", 0.0, 4),
        ("self", 1.0, 3),
        ("identical", 0.0, 3),
        ("self", 0.0, 5),
        ("self-copy", 0.0, 4),
        ("self-copy", 1.0, 3),
    ],
)
def test_caches_match_a_fresh_prefill_after_rejections(untied_loaded, draft_name, temperature, k):  # noqa: F811
    target, random_draft, self_draft, tokenizer = untied_loaded
    draft = {
        "random": random_draft,
        "self": self_draft,
        "identical": target,
        "self-copy": unshared_copy(self_draft),
    }[draft_name]
    prompt = build_prompt_tokens(tokenizer, GenerationRequest(prompt="Paris is the capital of"))
    decoder = _Decoder(target, draft, SamplingParams(temperature, seed=3), prompt, None)
    decoder.prefill(len(prompt) - 1, chunk=1024)
    rejected = bonus = 0
    for _ in range(8):
        accepted = run_alone(decoder.speculative_step(k)).accepted
        rejected += accepted < k
        bonus += accepted == k
    if draft_name == "identical":
        assert bonus == 8  # the draft cache lags by its last proposal every step
    else:
        assert rejected > 0
    seq = decoder.seq
    # A draft made of the target's own arrays runs on the target's cache; others keep theirs.
    assert decoder.shares_cache == (draft_name in {"self", "identical"})
    assert decoder.target_cache[0].offset == len(seq) - 1
    if decoder.shares_cache:
        assert all(d is t for d, t in zip(decoder.draft_cache, decoder.target_cache, strict=False))
        draft_len = len(seq) - 1
    else:
        assert decoder.draft_cache[0].offset == decoder.draft_len
        draft_len = decoder.draft_len
    # Continuing from each cache gives what a fresh prefill of the same tokens gives.
    np.testing.assert_allclose(
        np.array(_cached_last_logits(draft, decoder.draft_cache, seq[draft_len:])),
        np.array(_fresh_last_logits(draft, seq)),
        atol=1e-4,
    )
    trim_prompt_cache(decoder.draft_cache, len(seq) - draft_len)  # undo the check's advance
    np.testing.assert_allclose(
        np.array(_cached_last_logits(target, decoder.target_cache, seq[-1:])),
        np.array(_fresh_last_logits(target, seq)),
        atol=1e-4,
    )


def test_plain_steps_then_probe_catch_the_draft_up(untied_loaded):  # noqa: F811
    target, _, shared_self_draft, tokenizer = untied_loaded
    self_draft = unshared_copy(shared_self_draft)
    prompt = build_prompt_tokens(tokenizer, GenerationRequest(prompt="1 2 3"))
    decoder = _Decoder(target, self_draft, SamplingParams(), prompt, None)
    decoder.prefill(len(prompt) - 1, chunk=1024)
    for i in range(6):
        run_alone(decoder.plain_step())
        if i < 5:
            run_alone(decoder.queue_plain())
    decoder.drop_lookahead()
    assert decoder.draft_len == len(prompt) - 1  # the draft fell behind during plain steps
    run_alone(decoder.speculative_step(2))
    seq = decoder.seq
    assert decoder.target_cache[0].offset == len(seq) - 1
    np.testing.assert_allclose(
        np.array(_cached_last_logits(self_draft, decoder.draft_cache, seq[decoder.draft_len :])),
        np.array(_fresh_last_logits(self_draft, seq)),
        atol=1e-4,
    )


@pytest.mark.parametrize("k", [3, None])
def test_shared_cache_self_draft_proposes_what_its_own_cache_would(untied_loaded, k):  # noqa: F811
    """Sharing the target's cache changes where the draft's keys and values live, not what it
    proposes: the same steps as a copy with its own cache (adaptive K included: plain
    stretches, then probes that need no catch-up)."""
    target, _, self_draft, tokenizer = untied_loaded
    request = GenerationRequest(prompt="Once upon a time", max_tokens=48, draft_tokens=k)
    spec = SpeculationConfig(probe_interval=4)

    def traces(draft):
        events = generate(target, draft, tokenizer, request, spec)
        return [(e.trace.k, e.trace.proposed) for e in events if isinstance(e, StepEvent)]

    shared = traces(self_draft)
    assert sum(k for k, _ in shared) > 0
    assert shared == traces(unshared_copy(self_draft))


def test_an_adapted_self_draft_keeps_its_own_cache(untied_loaded):  # noqa: F811
    from speclora.daemon.learning import lora
    from test_engine_helpers import self_draft as make_self_draft

    target, _, self_draft, tokenizer = untied_loaded
    prompt = build_prompt_tokens(tokenizer, GenerationRequest(prompt="1 2 3"))
    assert _Decoder(target, self_draft, SamplingParams(), prompt, None).shares_cache
    adapted = make_self_draft(target, 2)
    lora.attach(adapted, lora.adapter_config(2, rank=4, scale=1.0, dropout=0.0))
    decoder = _Decoder(target, adapted, SamplingParams(), prompt, None)
    assert not decoder.shares_cache
    assert decoder.draft_cache[0] is not decoder.target_cache[0]


# ---------------------------------------------------------------------------- adaptive K


def test_adaptive_k_drops_to_zero_and_probes_with_backoff():
    ctl = AdaptiveK(
        min_k=0, max_k=8, start_k=4, probe_interval=4, step_costs=linear_step_costs(0.4)
    )
    assert ctl.next_k() == 4
    ctl.update(4, 0)
    ks = []
    for _ in range(60):
        k = ctl.next_k()
        ks.append(k)
        ctl.update(k, 0)
    assert ks[0] == 0
    probes = [i for i, k in enumerate(ks) if k > 0]
    assert all(ks[i] == 1 for i in probes)
    gaps = np.diff(probes).tolist()
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0]  # waits longer after each failure


def test_adaptive_k_rises_with_a_good_draft_and_recovers_after_probe():
    ctl = AdaptiveK(
        min_k=0, max_k=6, start_k=2, probe_interval=3, step_costs=linear_step_costs(0.2)
    )
    for _ in range(10):
        k = ctl.next_k()
        ctl.update(k, k)
    assert ctl.next_k() == 6
    for _ in range(25):  # the draft goes bad ...
        k = ctl.next_k()
        ctl.update(k, 0)
    assert ctl.next_k() == 0
    for _ in range(40):  # ... and good again: a probe notices
        k = ctl.next_k()
        ctl.update(k, k)
    assert ctl.next_k() >= 4


def test_adaptive_k_resumes_after_an_unlucky_run_without_waiting_for_a_probe():
    """A draft that is good on the whole (a = 0.6 from earlier requests) but rejected three
    times in a row stops drafting, then resumes within a few tokens, long before a probe."""
    ctl = AdaptiveK(
        min_k=0, max_k=4, start_k=1, probe_interval=1000, step_costs=linear_step_costs(0.3)
    )
    ctl.seed_from(0.6)
    assert ctl.next_k() >= 1
    for _ in range(3):
        k = ctl.next_k()
        ctl.update(k, 0)
    assert ctl.next_k() == 0
    plain = 0
    while ctl.next_k() == 0 and plain < 100:
        ctl.update(0, 0)
        plain += 1
    assert plain <= 12, plain


def test_adaptive_k_prices_each_k_separately():
    """Where a wide verify pass jumps in price (Intel MKL past 3 tokens), a good draft stops at
    the cheap K instead of the longest one a per-token price would pick."""
    costs = (1.0, 1.15, 1.3, 2.1, 2.25, 2.4, 2.55, 2.7, 2.85)
    ctl = AdaptiveK(min_k=0, max_k=8, step_costs=costs)
    ctl.seed_from(0.8)
    assert ctl.next_k() == 2
    linear = AdaptiveK(min_k=0, max_k=8, step_costs=linear_step_costs(0.15))
    linear.seed_from(0.8)
    assert linear.next_k() > 2


def test_measured_step_costs_start_at_one_pass_and_never_fall(untied_loaded):  # noqa: F811
    target, draft, _, _ = untied_loaded
    costs = measure_step_costs(target, draft, max_k=3, repeats=1)
    assert len(costs) == 4 and costs[0] == 1.0
    assert all(b > a for a, b in zip(costs, costs[1:], strict=False))


def test_adaptive_k_respects_min_and_bounds():
    ctl = AdaptiveK(min_k=2, max_k=3, start_k=2, probe_interval=4)
    for _ in range(10):
        k = ctl.next_k()
        assert 2 <= k <= 3
        ctl.update(k, 0)


def test_speedup_bound():
    assert speedup_bound(0.0, 4, 0.0) == pytest.approx(1.0)
    assert speedup_bound(1.0, 4, 0.0) == pytest.approx(5.0)
    assert speedup_bound(0.5, 1, 0.5) == pytest.approx(1.5 / 1.5)


def test_useless_draft_with_adaptive_k_is_mostly_plain_decoding(untied_loaded):  # noqa: F811
    target, random_draft, _, tokenizer = untied_loaded
    request = GenerationRequest(prompt="Write a haiku", max_tokens=80)
    events = list(generate(target, random_draft, tokenizer, request, SpeculationConfig()))
    traces = [e.trace for e in events if isinstance(e, StepEvent)]
    drafted = sum(t.k for t in traces)
    assert drafted <= 12  # the opening K plus a few probes
    assert sum(1 for t in traces if t.k == 0) >= 60


# ---------------------------------------------------------------------------- draft vocabulary


def test_draft_vocab_ranks_by_observed_frequency():
    vocab = DraftVocab(vocab_size=100, size=3, always=(99,))
    vocab.observe([7, 7, 7, 42, 42, 5])
    assert sorted(np.array(vocab.ids()).tolist()) == [5, 7, 42, 99]
    assert vocab.coverage([7, 42, 1]) == pytest.approx(2 / 3)
    cold = DraftVocab(vocab_size=100, size=4)
    assert np.array(cold.ids()).tolist() == [0, 1, 2, 3]  # prior: low ids first


def test_draft_vocab_reranks_in_batches_and_keeps_the_set_while_membership_holds():
    vocab = DraftVocab(vocab_size=100, size=2, refresh_every=4)
    vocab.observe([7, 7, 9])
    first = vocab.ids()
    assert np.array(first).tolist() == [7, 9]
    vocab.observe([5, 5, 5])  # 3 < 4 new tokens: not re-ranked yet
    assert vocab.ids() is first
    vocab.observe([7])  # re-ranked: 5 and 7 lead now
    assert np.array(vocab.ids()).tolist() == [5, 7]
    same = vocab.ids()
    vocab.observe([5, 7, 5, 7])  # re-ranked, same members: the same array (and head matrix)
    assert vocab.ids() is same


def test_concurrent_requests_share_one_restricted_head_matrix(untied_loaded):  # noqa: F811
    """Each request used to copy the N x D head rows; four streams made that the daemon's
    memory peak. Requests now share the vocabulary's matrix; only prompt extras are theirs."""
    target, _, self_draft, tokenizer = untied_loaded
    vocab = DraftVocab(vocab_size=target.lm_head.weight.shape[0], size=16)
    parts = model_parts(self_draft)
    heads = [DraftHead(parts, vocab, extra=prompt) for prompt in ([1, 2, 3], [4, 5], [])]
    subs = [head._restricted()[1] for head in heads]
    assert subs[0] is subs[1] is subs[2]
    assert vocab.head_bytes == subs[0].nbytes > 0
    hub = ModelHub(target, self_draft, tokenizer, "t", "d", weight_bytes=1000)
    assert hub.resident_weight_bytes() == 1000
    hub.extras["draft_vocab"] = vocab  # Stats counts the head's rows as the pair's weights
    assert hub.resident_weight_bytes() == 1000 + subs[0].nbytes
    base = set(np.array(vocab.ids()).tolist())
    ids, _, extra = heads[0]._restricted()
    assert set(np.array(ids).tolist()) == base | {1, 2, 3}
    assert (extra is None) == ({1, 2, 3} <= base)
    assert heads[2]._restricted()[2] is None


def test_restricted_draft_head_is_lossless_at_t0(untied_loaded):  # noqa: F811
    target, _, self_draft, tokenizer = untied_loaded
    request = GenerationRequest(prompt="Paris is the capital of", max_tokens=30, draft_tokens=3)
    *_, full = generate(target, self_draft, tokenizer, request, SpeculationConfig())
    vocab = DraftVocab(vocab_size=target.lm_head.weight.shape[0], size=16)
    vocab.observe(full.completion_token_ids[:10])
    events = list(
        generate(target, self_draft, tokenizer, request, SpeculationConfig(), draft_vocab=vocab)
    )
    restricted = events[-1]
    assert restricted.completion_token_ids == full.completion_token_ids
    allowed = set(np.array(vocab.ids()).tolist()) | set(restricted.prompt_token_ids)
    proposals = [x for e in events if isinstance(e, StepEvent) for x in e.trace.proposed]
    assert proposals and set(proposals) <= allowed


# ---------------------------------------------------------------------------- prompts


def test_chat_template_by_default_raw_on_request(untied_loaded):  # noqa: F811
    *_, tokenizer = untied_loaded
    chat = build_prompt_tokens(tokenizer, GenerationRequest(prompt="Hello there"))
    text = tokenizer.decode(chat)
    assert text.startswith("<|im_start|>user\nHello there<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    raw = build_prompt_tokens(tokenizer, GenerationRequest(prompt="Hello there", raw=True))
    assert tokenizer.decode(raw) == "Hello there"


def test_multi_turn_messages(untied_loaded):  # noqa: F811
    *_, tokenizer = untied_loaded
    turns = (
        ChatTurn("system", "Be brief."),
        ChatTurn("user", "Hi"),
        ChatTurn("assistant", "Hello!"),
        ChatTurn("user", "Capital of France?"),
    )
    text = tokenizer.decode(build_prompt_tokens(tokenizer, GenerationRequest(messages=turns)))
    assert text.index("Be brief.") < text.index("Hi") < text.index("Hello!") < text.index("France")
    assert text.endswith("<|im_start|>assistant\n")
    prefilled = turns[:2] + (ChatTurn("assistant", "Sure, the answer"),)
    text = tokenizer.decode(build_prompt_tokens(tokenizer, GenerationRequest(messages=prefilled)))
    assert text.endswith("Sure, the answer")  # the assistant's turn is continued


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (GenerationRequest(), "prompt"),
        (GenerationRequest(messages=(ChatTurn("robot", "x"),)), "messages[0].role"),
        (GenerationRequest(prompt="a", messages=(ChatTurn("user", "x"),)), "prompt"),
        (GenerationRequest(messages=(ChatTurn("user", "x"),), raw=True), "raw"),
        (GenerationRequest(messages=(ChatTurn("system", "x"),)), "messages"),
    ],
)
def test_bad_requests_name_the_field(untied_loaded, request_, field):  # noqa: F811
    *_, tokenizer = untied_loaded
    with pytest.raises(InvalidRequestError) as info:
        build_prompt_tokens(tokenizer, request_)
    assert info.value.field == field


def test_acceptance_memory_starts_a_useless_draft_at_zero(untied_loaded):  # noqa: F811
    from speclora.daemon.engine import AcceptanceMemory

    target, random_draft, self_draft, tokenizer = untied_loaded
    memory = AcceptanceMemory()
    request = GenerationRequest(prompt="Write a haiku", max_tokens=24)
    spec = SpeculationConfig()
    first = list(generate(target, random_draft, tokenizer, request, spec, acceptance_memory=memory))
    assert first[-1].proposed >= spec.adaptive_start  # no memory yet: opens at adaptive_start
    assert memory.alpha is not None and memory.alpha < 0.2
    again = list(generate(target, random_draft, tokenizer, request, spec, acceptance_memory=memory))
    ks = [e.trace.k for e in again if isinstance(e, StepEvent)]
    # The memory says the draft is useless: a one-token probe instead of K = adaptive_start,
    # then plain steps (this request is short: no second probe is due).
    assert ks[0] == 1 and set(ks[1:]) == {0}
    assert 0 < again[-1].proposed <= 2  # still tested, so still recordable as a failure case
    assert again[-1].completion_token_ids == first[-1].completion_token_ids
    # An identical draft is believed at once.
    memory.reset()
    list(generate(target, target, tokenizer, request, spec, acceptance_memory=memory))
    assert memory.alpha == 1.0
    # Seeded sampling ignores the memory: same output whatever it holds.
    seeded = GenerationRequest(
        prompt="Write a haiku", max_tokens=24, sampling=SamplingParams(1.0, seed=4)
    )
    a = list(generate(target, self_draft, tokenizer, seeded, spec, acceptance_memory=memory))
    b = list(generate(target, self_draft, tokenizer, seeded, spec))
    assert a[-1].completion_token_ids == b[-1].completion_token_ids


def test_restricted_head_of_a_quantized_draft(tmp_path):
    """Only the chosen rows of a quantized head are dequantized; output stays exact."""
    import mlx.nn as nn
    from mlx_lm import load
    from speclora.daemon.engine.draft_vocab import model_parts
    from speclora.daemon.tiny import TinyModelSpec, write_tiny_model
    from test_engine_helpers import self_draft

    path = write_tiny_model(tmp_path / "q", TinyModelSpec(num_layers=3, seed=5))
    target, tokenizer = load(str(path))
    nn.quantize(target, group_size=64, bits=8)
    draft = self_draft(target, 1)
    parts = model_parts(draft)
    ids = mx.array([3, 17, 200])
    rows = parts.head_rows(ids)
    full = mx.dequantize(
        draft.lm_head.weight,
        draft.lm_head.scales,
        draft.lm_head.biases,
        draft.lm_head.group_size,
        draft.lm_head.bits,
    )
    np.testing.assert_allclose(np.array(rows), np.array(full[ids]), atol=1e-6)
    request = GenerationRequest(prompt="Hello", max_tokens=16, draft_tokens=2)
    *_, plain = generate(target, None, tokenizer, request, SpeculationConfig())
    vocab = DraftVocab(vocab_size=parts.vocab_rows(), size=32)
    *_, fast = generate(target, draft, tokenizer, request, SpeculationConfig(), draft_vocab=vocab)
    assert fast.completion_token_ids == plain.completion_token_ids
