"""Failure cases on the toy domain (speclora.daemon.learning.toy), as the engine records them."""

from __future__ import annotations

import mlx.core as mx
from speclora.daemon.learning import toy
from speclora.daemon.learning.store import FailureCase, FailureStore
from speclora.daemon.state import ModelHub


def greedy(model: object, ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    seq = list(ids)
    for _ in range(n):
        token = int(mx.argmax(model(mx.array([seq]))[0, -1]).item())  # type: ignore[operator]
        out.append(token)
        seq.append(token)
    return out


def domain_completions(
    hub: ModelHub, n: int, seed: int = 0, tokens: int = 24
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, the target's greedy completion) for n domain prompts."""
    out = []
    for prompt in toy.domain_prompts(n, seed):
        ids = hub.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True
        )
        out.append((list(ids), greedy(hub.target, ids, tokens)))
    return out


def cases_from(hub: ModelHub, completions: list[tuple[list[int], list[int]]]) -> list[FailureCase]:
    """Cases at T = 0 as the engine records them: where the hub's draft was wrong."""
    cases = []
    for ids, completion in completions:
        guesses = mx.argmax(hub.draft(mx.array([ids + completion]))[0], axis=-1).tolist()
        rejected = tuple(j for j, tok in enumerate(completion) if guesses[len(ids) - 1 + j] != tok)
        cases.append(
            FailureCase(
                tuple(ids),
                tuple(completion),
                rejection_positions=rejected,
                proposed=len(completion),
                accepted=len(completion) - len(rejected),
            )
        )
    return cases


def domain_cases(hub: ModelHub, n: int, seed: int = 0, tokens: int = 24) -> list[FailureCase]:
    """Cases at T = 0: the target's output on domain prompts, and where the draft was wrong."""
    return cases_from(hub, domain_completions(hub, n, seed, tokens))


def record_domain_cases(hub: ModelHub, store: FailureStore, n: int, seed: int = 0) -> None:
    for case in domain_cases(hub, n, seed):
        store.add(case)
