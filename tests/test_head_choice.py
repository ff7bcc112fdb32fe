"""The restricted draft head is kept only while it pays, judged from what requests show."""

from __future__ import annotations

import random

from speclora.daemon.engine.costs import StepPrices
from speclora.daemon.engine.draft_vocab import DraftVocab, HeadChoice

VERIFY = (1.0, 1.25, 1.3, 1.33, 1.35, 1.37, 1.38, 1.39, 1.4)
# A cheap restricted head (0.12 of a target pass) beside a full head that costs 0.3.
CHEAP, FULL = StepPrices(VERIFY, 0.12), StepPrices(VERIFY, 0.3)


def request(rng: random.Random, outside: float, a_in: float, a_out: float, restricted: bool):
    """One request's (completion, from_draft, rejection_positions): the draft is tested at 40
    positions; a target token lies outside the 10-token set with probability `outside`; the
    draft gets an inside token right with probability a_in, an outside one with a_out (never,
    with the restricted head)."""
    completion, from_draft, rejections = [], [], []
    for i in range(40):
        out = rng.random() < outside
        completion.append(rng.randrange(50, 100) if out else rng.randrange(0, 10))
        p = (0.0 if restricted else a_out) if out else a_in
        accepted = rng.random() < p
        from_draft.append(accepted)
        if not accepted:
            rejections.append(i)
    return completion, from_draft, rejections


def serve(choice: HeadChoice, vocab: DraftVocab, n: int, **process) -> list[bool]:
    rng = random.Random(0)
    used = []
    for _ in range(n):
        restricted = choice.use_restricted
        used.append(restricted)
        choice.observe(vocab, restricted, *request(rng, restricted=restricted, **process))
    return used


def test_a_set_that_covers_the_output_keeps_the_cheap_head():
    vocab = DraftVocab(vocab_size=100, size=10)
    choice = HeadChoice(CHEAP, FULL)
    used = serve(choice, vocab, 30, outside=0.02, a_in=0.6, a_out=0.6)
    assert all(used)


def test_a_set_that_misses_the_targets_tokens_switches_to_the_full_head_and_stays():
    # A large vocabulary: 35% of the target's tokens are outside the set, and the full head
    # gets them as often as the rest (what the 151k-token pair showed: 0.79 -> 0.49).
    vocab = DraftVocab(vocab_size=100, size=10)
    choice = HeadChoice(CHEAP, FULL)
    used = serve(choice, vocab, 40, outside=0.35, a_in=0.8, a_out=0.8)
    assert used[0] and not any(used[5:])


def test_an_optimistic_estimate_that_does_not_hold_goes_back_to_the_cheap_head():
    # Outside tokens look costly, but the full head gets them wrong anyway: after trying it,
    # its measured acceptance sends the choice back to the restricted head.
    vocab = DraftVocab(vocab_size=100, size=10)
    choice = HeadChoice(CHEAP, FULL)
    used = serve(choice, vocab, 40, outside=0.35, a_in=0.8, a_out=0.0)
    # (it tries the full head again only after ~50 requests, when its figure has faded)
    assert not all(used[:10])  # it tried the full head ...
    assert all(used[-10:])  # ... and came back
