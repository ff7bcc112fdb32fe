"""The history drafter's index (daemon/engine/history.py): semantics, bounds, and random
inputs checked against a brute-force reference that implements the same rules directly."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from speclora.daemon.engine import history
from speclora.daemon.engine.history import HistoryProposal, RequestHistory, SuffixIndex

# --------------------------------------------------------------------------- the reference


def reference(
    docs: Sequence[Sequence[int]],
    context: Sequence[int],
    max_len: int,
    *,
    min_match: int = 2,
    max_match: int = 32,
    max_candidates: int = 64,
    min_token_prob: float = 0.1,
    spec_factor: float = 1.0,
    source: str = "history",
) -> HistoryProposal | None:
    """The module docstring's rules, written the slow and obvious way."""
    ctx = list(context)[-max_match:]
    found = []  # (match length, doc index, continuation position)
    for d, doc in enumerate(docs):
        for p in range(1, len(doc)):  # doc[p] exists: a continuation
            length = 0
            while (
                length < len(ctx)
                and p - 1 - length >= 0
                and doc[p - 1 - length] == ctx[-1 - length]
            ):
                length += 1
            if length >= min_match:
                found.append((length, d, p))
    if not found:
        return None
    best = max(f[0] for f in found)
    cands = sorted(((d, p) for length, d, p in found if length == best), reverse=True)
    cands = cands[:max_candidates]
    n = min(max_len, int(spec_factor * best + 1e-6))
    tokens: list[int] = []
    confidence: list[float] = []
    cum = 1.0
    for j in range(n):
        nexts = [docs[d][p + j] if p + j < len(docs[d]) else None for d, p in cands]
        real = [t for t in nexts if t is not None]
        if not real:
            break
        counts = Counter(real)
        top = max(counts.values())
        choice = next(t for t in nexts if t is not None and counts[t] == top)
        conf = top / len(cands)
        if cum * conf < min_token_prob:
            break
        cum *= conf
        tokens.append(choice)
        confidence.append(conf)
        cands = [c for c, t in zip(cands, nexts, strict=True) if t == choice]
    if not tokens:
        return None
    return HistoryProposal(tuple(tokens), tuple(confidence), best, source)


def kept(docs: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
    """What a bounded index keeps: the newest documents within max_tokens (each cut to it)."""
    out: list[list[int]] = []
    total = 0
    for doc in reversed([list(d)[-max_tokens:] for d in docs if len(d)]):
        if total + len(doc) > max_tokens and out:
            break
        out.append(doc)
        total += len(doc)
    return out[::-1]


def index_of(docs: Sequence[Sequence[int]], **kw) -> SuffixIndex:
    index = SuffixIndex(kw.pop("max_tokens", 1_000_000), background=False, **kw)
    for doc in docs:
        index.add(doc)
    return index


# --------------------------------------------------------------------------- semantics


def test_longest_match_wins_over_a_more_frequent_shorter_one() -> None:
    docs = [[7, 8, 1]] * 5 + [[5, 6, 7, 8, 2]]
    proposal = index_of(docs).propose([5, 6, 7, 8], 4, spec_factor=4)
    assert proposal == HistoryProposal((2,), (1.0,), 4, "history")
    # Without the longer context the five-to-one majority decides.
    shorter = index_of(docs).propose([0, 7, 8], 4, spec_factor=4)
    assert shorter is not None and shorter.tokens[0] == 1 and shorter.match_len == 2
    assert shorter.confidence[0] == pytest.approx(5 / 6)


def test_most_frequent_continuation_and_its_confidence_from_counts() -> None:
    docs = [[1, 2, 3, 10, 11], [1, 2, 3, 10, 12], [1, 2, 3, 10, 12], [1, 2, 3, 20]]
    proposal = index_of(docs).propose([1, 2, 3], 8, spec_factor=4, min_token_prob=0.0)
    # 10 follows three of four; then 12 follows two of those three.
    assert proposal == HistoryProposal((10, 12), (0.75, 2 / 3), 3, "history")
    assert proposal.expected_accepted == pytest.approx(0.75 + 0.75 * 2 / 3)


def test_ties_go_to_the_most_recent_occurrence() -> None:
    assert index_of([[1, 2, 5], [1, 2, 6]]).propose([1, 2], 1).tokens == (6,)
    assert index_of([[1, 2, 6], [1, 2, 5]]).propose([1, 2], 1).tokens == (5,)


def test_min_token_prob_is_a_cumulative_threshold() -> None:
    # 4 then (2 of 3) 5 then (1 of 2) 6: cumulative 1, 2/3, 1/3.
    docs = [[1, 2, 4, 5, 6], [1, 2, 4, 5, 7], [1, 2, 4, 9]]
    index = index_of(docs)
    assert index.propose([1, 2], 8, spec_factor=8, min_token_prob=0.0).tokens == (4, 5, 7)
    assert index.propose([1, 2], 8, spec_factor=8, min_token_prob=0.5).tokens == (4, 5)
    assert index.propose([1, 2], 8, spec_factor=8, min_token_prob=0.7).tokens == (4,)


def test_spec_factor_and_max_len_bound_the_length() -> None:
    index = index_of([list(range(100, 140))])
    context = [100, 101, 102]  # a 3-token match
    assert len(index.propose(context, 30, spec_factor=1.0).tokens) == 3
    assert len(index.propose(context, 30, spec_factor=2.5).tokens) == 7
    assert len(index.propose(context, 5, spec_factor=10).tokens) == 5
    assert index.propose(context, 30, spec_factor=0.2) is None  # int(0.6) = 0 tokens
    assert index.propose(context, 0) is None


def test_match_needs_min_match_tokens_and_is_capped_at_max_match() -> None:
    index = index_of([[1, 2, 3, 4]], min_match=3)
    assert index.propose([2, 3], 4) is None
    assert index.propose([1, 2, 3], 4).tokens == (4,)
    long_doc = list(range(1000, 1100))
    capped = index_of([long_doc], max_match=8).propose(long_doc[:50], 100, spec_factor=100)
    assert capped.match_len == 8 and capped.tokens == tuple(long_doc[50:])


def test_document_boundaries_are_never_crossed() -> None:
    # [1, 2] ends document 0 and document 1 starts with 3: no match spans them, and no
    # continuation runs from one document into the next.
    index = index_of([[9, 1, 2], [3, 4]])
    assert index.propose([1, 2], 4) is None  # [1, 2] is at a document end: nothing follows
    assert index.propose([2, 3], 4) is None  # only "across" the boundary
    proposal = index_of([[9, 1, 2, 5], [6, 7]]).propose([1, 2], 10, spec_factor=10)
    assert proposal.tokens == (5,)


def test_eviction_keeps_the_index_bounded_and_forgets_the_oldest() -> None:
    index = SuffixIndex(100, background=False)
    index.add([1, 2, 3] + [50] * 37)  # 40 tokens
    for i in range(5):
        index.add([200 + i] * 30)  # 150 more: the first document must go
        assert index.tokens <= 100
    assert index.documents == 3 and index.tokens == 90
    assert index.propose([1, 2], 4) is None
    index.add([1, 2, 7])
    assert index.propose([1, 2], 4).tokens == (7,)
    big = SuffixIndex(10, background=False)
    big.add(list(range(50)))  # a document longer than the bound keeps its end
    assert big.tokens == 10 and big.propose([45, 46], 5).tokens == (47, 48)


def test_evicted_entries_still_in_the_sorted_segment_are_never_answers() -> None:
    index = SuffixIndex(10, background=False)
    index.add([1, 2, 3, 4, 5])
    index.add([9, 3, 4, 6])
    index.rebuild()  # both documents sorted
    index.add([7, 7])  # the first document is evicted; the segment still lists its entries
    # [1, 2, 3, 4] matched fully only in the evicted document; the live match is [3, 4].
    assert index.propose([1, 2, 3, 4], 4) == HistoryProposal((6,), (1.0,), 2, "history")


def test_memory_is_bounded_by_max_tokens() -> None:
    rng = np.random.default_rng(0)
    index = SuffixIndex(20_000, background=False)
    for _ in range(400):
        index.add(rng.integers(0, 5000, 500).tolist())  # 200k tokens through a 20k bound
        assert index.tokens <= 20_000
    # 4 bytes of buffer and 12 of sorted entry per token, tails of slack, small fixed costs.
    assert index.nbytes < 20_000 * 16 * 3 + 200_000, index.nbytes
    assert index.nbytes > 20_000 * 4


def test_request_history_finds_copied_spans_in_its_prompt() -> None:
    passage = list(range(300, 340))
    prompt = [1, 2, *passage, 3, 4]
    request = RequestHistory(prompt, None)
    assert request.proposals(16) == []  # [3, 4] occurs nowhere else
    request.extend([passage[0], passage[1]])  # the model starts quoting the passage
    [proposal] = request.proposals(16, spec_factor=8)
    assert proposal.source == "prompt" and proposal.match_len == 2
    assert proposal.tokens == tuple(passage[2:18])
    request.extend(passage[2:12])
    [longer] = request.proposals(16, spec_factor=8)
    assert longer.match_len == 12 and longer.tokens == tuple(passage[12:28])


def test_request_history_never_matches_its_own_suffix() -> None:
    request = RequestHistory([5, 6, 7], None)
    assert request.proposals(4) == []
    request.extend([5, 6])
    assert [p.tokens for p in request.proposals(4)] == [(7, 5)]


def test_request_history_offers_its_own_match_and_the_historys() -> None:
    index = index_of([[10, 11, 12, 13, 14, 15, 16]])
    request = RequestHistory([11, 12, 13, 99, 12, 13], index)
    # [12, 13] matches in both: the prompt continues with 99, the history with 14, 15; both
    # are offered, the request's own first (the controller prices them apart).
    own, past = request.proposals(2, spec_factor=4)
    assert (own.source, own.tokens, own.match_len) == ("prompt", (99, 12), 2)
    assert (past.source, past.tokens) == ("history", (14, 15))
    other = RequestHistory([10, 11, 12, 13], index)  # only the history holds a match
    assert other.proposals(3, spec_factor=4) == [
        HistoryProposal((14, 15, 16), (1.0,) * 3, 4, "history")
    ]
    assert request.proposals(0) == []


def test_clear_forgets_everything() -> None:
    index = index_of([[1, 2, 3]])
    index.clear()
    assert (index.tokens, index.documents) == (0, 0)
    assert index.propose([1, 2], 4) is None
    index.add([1, 2, 4])
    assert index.propose([1, 2], 4).tokens == (4,)


def test_bad_input_is_a_clear_error() -> None:
    index = SuffixIndex(100)
    with pytest.raises(ValueError, match="token ids"):
        index.add([1, -2])
    with pytest.raises(ValueError, match="token ids"):
        index.propose([1, -2], 4)
    with pytest.raises(ValueError, match="min_match"):
        SuffixIndex(100, min_match=0)
    with pytest.raises(ValueError, match="max_match"):
        SuffixIndex(100, min_match=4, max_match=3)
    with pytest.raises(ValueError, match="max_tokens"):
        SuffixIndex(0)


def test_background_rebuild_gives_the_same_answers() -> None:
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 50, rng.integers(20, 400)).tolist() for _ in range(60)]
    index = SuffixIndex(1_000_000)  # background builds, tail bound 2048 tokens
    for doc in docs:
        index.add(doc)
    contexts = [rng.integers(0, 50, 6).tolist() for _ in range(50)] + [d[:9] for d in docs]
    during = [index.propose(c, 8, spec_factor=4) for c in contexts]
    index.wait()
    after = [index.propose(c, 8, spec_factor=4) for c in contexts]
    expected = [reference(docs, c, 8, spec_factor=4) for c in contexts]
    assert during == expected and after == expected


# --------------------------------------------------------------------------- random inputs

tokens = st.lists(st.integers(0, 3), min_size=0, max_size=40)


@pytest.fixture(params=[(64, 4096), (1, 4096), (64, 7), (1, 7)])
def block(request, monkeypatch) -> int:
    """Both ways of narrowing the scanned tail's candidates (one vectorised block, or token by
    token first), with the default tail bound and with one so small that both sorted segments
    are rebuilt every few tokens (so evicted entries sit in them, and a request's own tokens
    get one)."""
    monkeypatch.setattr(history, "_BLOCK", request.param[0])
    monkeypatch.setattr(history, "_TAIL", request.param[1])
    return request.param[0]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    docs=st.lists(tokens, min_size=1, max_size=12),
    context=st.lists(st.integers(0, 3), min_size=1, max_size=10),
    max_len=st.integers(1, 12),
    min_match=st.integers(1, 3),
    max_match=st.integers(3, 8),
    max_candidates=st.integers(1, 6),
    min_token_prob=st.sampled_from([0.0, 0.1, 0.4]),
    spec_factor=st.sampled_from([0.5, 1.0, 2.0, 4.0]),
    max_tokens=st.integers(5, 200),
    sort_at=st.integers(0, 12),
)
def test_index_matches_the_reference(
    block,
    docs,
    context,
    max_len,
    min_match,
    max_match,
    max_candidates,
    min_token_prob,
    spec_factor,
    max_tokens,
    sort_at,
) -> None:
    params = dict(min_match=min_match, max_match=max_match, max_candidates=max_candidates)
    index = SuffixIndex(max_tokens, background=False, **params)
    for i, doc in enumerate(docs):
        if i == sort_at:
            index.rebuild()  # what came before is sorted, the rest is the scanned tail
        index.add(doc)
    got = index.propose(context, max_len, min_token_prob=min_token_prob, spec_factor=spec_factor)
    want = reference(
        kept(docs, max_tokens),
        context,
        max_len,
        min_token_prob=min_token_prob,
        spec_factor=spec_factor,
        **params,
    )
    assert got == want
    assert index.tokens == sum(len(d) for d in kept(docs, max_tokens))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    past=st.lists(tokens, min_size=0, max_size=6),
    prompt=st.lists(st.integers(0, 3), min_size=0, max_size=30),
    steps=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=4), max_size=6),
    max_len=st.integers(1, 10),
    min_match=st.integers(1, 3),
    spec_factor=st.sampled_from([1.0, 3.0]),
)
def test_request_history_matches_the_reference(
    block, past, prompt, steps, max_len, min_match, spec_factor
) -> None:
    index = index_of(past, min_match=min_match, max_match=6) if past else None
    request = RequestHistory(prompt, index, min_match=min_match, max_match=6)
    seq = list(prompt)
    for step in [[], *steps]:
        request.extend(step)
        seq += step
        got = request.proposals(max_len, spec_factor=spec_factor)
        kw = dict(min_match=min_match, max_match=6, spec_factor=spec_factor)
        own = reference([seq], seq, max_len, source="prompt", **kw)
        other = reference(past, seq, max_len, **kw) if index is not None else None
        assert got == [p for p in (own, other) if p is not None], (seq, step)


def test_sorted_segment_on_a_large_random_corpus(block) -> None:
    """Long ranges (a small vocabulary over 20k tokens) through both resolution paths."""
    rng = np.random.default_rng(2)
    docs = [rng.integers(0, 6, rng.integers(50, 600)).tolist() for _ in range(60)]
    index = index_of(docs, max_tokens=15_000)
    index.rebuild()
    index.add(docs[-1])  # and something in the tail again
    live = kept([*docs, docs[-1]], 15_000)
    for _ in range(40):
        context = rng.integers(0, 6, 12).tolist()
        assert index.propose(context, 8, spec_factor=2) == reference(
            live, context, 8, spec_factor=2
        )


def test_adds_from_another_thread_while_proposing(monkeypatch) -> None:
    """The daemon adds finished requests from its writer thread while the engine proposes;
    background builds swap in meanwhile. Nothing breaks and the end state is exact."""
    import threading

    monkeypatch.setattr(history, "_TAIL", 300)  # many builds, both levels
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 20, rng.integers(10, 200)).tolist() for _ in range(300)]
    index = SuffixIndex(5_000)
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for doc in docs:
                index.add(doc)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    while thread.is_alive():
        index.propose(rng.integers(0, 20, 8).tolist(), 8)
    thread.join()
    index.wait()
    assert not errors
    live = kept(docs, 5_000)
    assert index.tokens == sum(map(len, live))
    for _ in range(30):
        context = rng.integers(0, 20, 8).tolist()
        assert index.propose(context, 8) == reference(live, context, 8)


def test_add_many_is_add_in_order_then_sorted() -> None:
    rng = np.random.default_rng(4)
    docs = [rng.integers(0, 30, rng.integers(1, 300)).tolist() for _ in range(80)]
    one_by_one = index_of(docs, max_tokens=8_000)
    loaded = SuffixIndex(8_000, background=False)
    loaded.add_many([np.asarray(d, dtype="<i4") for d in docs])
    assert (loaded.tokens, loaded.documents) == (one_by_one.tokens, one_by_one.documents)
    for _ in range(40):
        context = rng.integers(0, 30, 10).tolist()
        assert loaded.propose(context, 12) == one_by_one.propose(context, 12)
