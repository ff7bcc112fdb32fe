"""Structured output through the whole detailed engine: lossless under speculation.

At T = 0 the output under a schema is token for token the constrained target-only output
(draft_tokens 0: a plain masked pass per token), whoever proposed: a draft masked by the
grammar, a restricted draft head, history (here a scripted one that also proposes illegal
tokens), or the grammar's own forced runs. At T > 0 the first tokens are distributed as the
constrained target's, computed exactly from the target's masked rows. Every completed output
parses and validates against its schema; one that runs out of max_tokens says so.
"""

from __future__ import annotations

import dataclasses
import json
import re

import jsonschema
import mlx.core as mx
import pytest
from speclora.daemon.engine import DraftVocab, GenerationRequest, SamplingParams, generate
from speclora.daemon.engine.grammar import GrammarState, compile_constraint
from speclora.daemon.engine.sampling import probabilities
from speclora.daemon.errors import InvalidRequestError
from speclora.daemon.requests import generation_request
from speclora.shared.config import Config, SpeculationConfig
from test_engine import PROMPTS, run  # noqa: F401
from test_engine_distribution import spread_pair  # noqa: F401  (fixture)
from test_engine_helpers import chi_square_p_value, untied_loaded  # noqa: F401  (fixture)
from test_engine_sources import ScriptedHistory

SPEC = SpeculationConfig()
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}
CONSTRAINT = compile_constraint("json_schema", json.dumps(SCHEMA))


def request(prompt: str, constraint=CONSTRAINT, **kw) -> GenerationRequest:
    kw.setdefault("max_tokens", 96)
    return GenerationRequest(prompt=prompt, constraint=constraint, **kw)


def text_of(tokenizer, summary) -> str:
    return tokenizer.decode(
        [t for t in summary.completion_token_ids if t not in tokenizer.eos_token_ids]
    )


@pytest.fixture(scope="module")
def constrained_refs(untied_loaded):  # noqa: F811
    """Constrained target-only outputs (plain masked decoding), per prompt."""
    target, _, _, tokenizer = untied_loaded
    refs = {}
    for prompt in PROMPTS:
        _, summary = run(target, None, tokenizer, request(prompt, draft_tokens=0))
        assert summary.proposed == summary.grammar_proposed  # only the free end token
        refs[prompt] = summary
    return refs


def test_outputs_parse_and_validate(untied_loaded, constrained_refs):  # noqa: F811
    _, _, _, tokenizer = untied_loaded
    finished = 0
    for summary in constrained_refs.values():
        if summary.finish_reason == "grammar_incomplete":
            continue
        assert summary.finish_reason == "eos"
        jsonschema.validate(json.loads(text_of(tokenizer, summary)), SCHEMA)
        finished += 1
    assert finished >= 3


@pytest.mark.parametrize("draft_name", ["identical", "random", "self"])
@pytest.mark.parametrize("k", [None, 1, 3])
def test_greedy_under_a_schema_equals_constrained_target_only(
    untied_loaded,  # noqa: F811
    constrained_refs,
    draft_name,
    k,
):
    target, random_draft, self_draft, tokenizer = untied_loaded
    draft = {"identical": target, "random": random_draft, "self": self_draft}[draft_name]
    for prompt in PROMPTS[:3]:
        _, summary = run(target, draft, tokenizer, request(prompt, draft_tokens=k))
        ref = constrained_refs[prompt]
        assert summary.completion_token_ids == ref.completion_token_ids
        assert summary.finish_reason == ref.finish_reason
        if k is None:  # the grammar's forced runs were proposed with no draft pass
            assert summary.grammar_proposed > 0
            assert summary.target_passes < ref.target_passes
        if draft_name == "identical" and k is not None:
            assert summary.draft_accepted == summary.draft_proposed > 0


def test_restricted_draft_head_and_history_stay_exact(untied_loaded, constrained_refs):  # noqa: F811
    """A head of 12 tokens (most legal tokens outside it: the draft stops early or falls back
    to a plain pass) and history proposals that are often illegal (cut at the legal prefix)."""
    target, _, self_draft, tokenizer = untied_loaded
    vocab = DraftVocab(vocab_size=target.lm_head.weight.shape[0], size=12)
    for prompt in PROMPTS[:3]:
        ref = constrained_refs[prompt]
        _, summary = run(target, self_draft, tokenizer, request(prompt), draft_vocab=vocab)
        assert summary.completion_token_ids == ref.completion_token_ids
        from speclora.daemon.engine import build_prompt_tokens

        ids = build_prompt_tokens(tokenizer, GenerationRequest(prompt=prompt))
        script = list(ref.completion_token_ids)
        history = ScriptedHistory(ids, script, noise=0.3, seed=1)
        _, summary = run(target, self_draft, tokenizer, request(prompt), history=history)
        assert summary.completion_token_ids == ref.completion_token_ids
        assert history.calls > 0


def test_regex_and_lark_outputs_match(untied_loaded):  # noqa: F811
    target, _, self_draft, tokenizer = untied_loaded
    regex = r"[a-z]{2,6}-[0-9]{2}"
    lark = 'start: "(" WORD ("," WORD)* ")"\nWORD: /[a-e]{1,3}/'
    for constraint, check in (
        (compile_constraint("regex", regex), lambda t: re.fullmatch(regex, t)),
        (
            compile_constraint("lark", lark),
            lambda t: re.fullmatch(r"\([a-e]{1,3}(,[a-e]{1,3})*\)", t),
        ),
        (compile_constraint("json_object", ""), lambda t: isinstance(json.loads(t), dict)),
    ):
        for prompt in PROMPTS[:2]:
            _, ref = run(target, None, tokenizer, request(prompt, constraint, draft_tokens=0))
            _, summary = run(target, self_draft, tokenizer, request(prompt, constraint))
            assert summary.completion_token_ids == ref.completion_token_ids
            if summary.finish_reason == "eos":
                assert check(text_of(tokenizer, summary)), text_of(tokenizer, summary)
            else:
                assert summary.finish_reason == "grammar_incomplete"


def test_max_tokens_too_short_for_the_schema_says_so(untied_loaded):  # noqa: F811
    target, _, self_draft, tokenizer = untied_loaded
    _, summary = run(target, self_draft, tokenizer, request(PROMPTS[0], max_tokens=6))
    assert summary.finish_reason == "grammar_incomplete"
    assert summary.completion_tokens == 6


def test_the_end_token_after_a_complete_document_needs_no_pass(untied_loaded):  # noqa: F811
    target, _, _, tokenizer = untied_loaded
    constraint = compile_constraint("regex", "ab")
    _, summary = run(target, None, tokenizer, request(PROMPTS[0], constraint, draft_tokens=0))
    assert text_of(tokenizer, summary) == "ab"
    assert summary.finish_reason == "eos"
    assert summary.target_passes == summary.completion_tokens - 1


def test_matcher_push_pop_around_the_end_token(untied_loaded):  # noqa: F811
    """The matcher does not record an end token after a complete grammar: popping it must not
    roll back the token before it."""
    target, _, _, tokenizer = untied_loaded
    vocab = target.lm_head.weight.shape[0]
    state = GrammarState(compile_constraint("regex", "ab"), tokenizer, vocab)
    ids = tokenizer.encode("ab", add_special_tokens=False)
    assert state.legal_prefix(ids + [state.eos, ids[0]]) == len(ids) + 1
    state.advance(ids)
    assert state.only() == state.eos
    masks = state.masks([state.eos])
    assert masks.shape == (2, vocab)
    assert state.only() == state.eos and state.accepting()
    state.push(state.eos)
    state.pop(1)
    assert state.accepting() and state.only() == state.eos


def test_the_fixed_bytes_after_a_forced_run_are_guessed_legally(untied_loaded):  # noqa: F811
    """After `"age":` the grammar fixes the space but cannot force a token for it (` 1` may
    start the number): `likely` proposes a legal split of those bytes after the forced run and
    leaves the state as it was; in free text it proposes nothing."""
    target, _, _, tokenizer = untied_loaded
    state = GrammarState(CONSTRAINT, tokenizer, target.lm_head.weight.shape[0])
    state.advance(tokenizer.encode('{"name": "ab", "ag', add_special_tokens=False))
    forced = state.forced(32)
    guess = state.likely(forced, 32)
    assert tokenizer.decode([*forced, *guess]) == 'e": '
    assert guess and state.legal_prefix([*forced, *guess]) == len(forced) + len(guess)
    assert state.forced(32) == forced and state.likely(forced, 32) == guess  # nothing consumed
    assert state.likely(forced, 0) == ()
    state.advance([*forced, *guess, *tokenizer.encode("1", add_special_tokens=False)])
    assert state.forced(32) == () and state.likely((), 32) == ()  # a number: nothing fixed


def test_free_end_is_an_end_token_the_grammar_forces(untied_loaded):  # noqa: F811
    target, _, _, tokenizer = untied_loaded
    state = GrammarState(
        compile_constraint("regex", "ab"), tokenizer, target.lm_head.weight.shape[0]
    )
    ids = tokenizer.encode("ab", add_special_tokens=False)
    assert state.free_end([*ids, state.eos]) and not state.free_end(ids)
    assert not state.free_end([state.eos])  # nothing written yet: "ab" still to come
    assert state.only() != state.eos and state.legal_prefix(ids) == len(ids)  # state kept


# ---------------------------------------------------------------------- T > 0

PARAMS = dict(temperature=1.0, top_k=4)
N = 1200
DIST_GRAMMAR = r"\{[a-h]{1,4}\}"  # a forced "{", then letters: forced runs and free choices


def _exact_joint(target, state: GrammarState, ids: list[int], depth: int) -> dict:
    """P(first `depth` tokens) of constrained target-only sampling, from the masked rows."""
    params = SamplingParams(**PARAMS)
    out: dict[tuple[int, ...], float] = {}

    def walk(prefix: list[int], mass: float) -> None:
        if len(prefix) == depth:
            out[tuple(prefix)] = mass
            return
        logits = target(mx.array([ids + prefix]))[0, -1]
        allowed = mx.array(state.allowed())
        probs = probabilities(mx.where(allowed, logits, float("-inf")), params).tolist()
        for token, p in enumerate(probs):
            if p > 0:
                state.push(token)
                walk(prefix + [token], mass * p)
                state.pop(1)

    walk([], 1.0)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["adaptive", "draft2", "restricted"])
def test_sampling_under_a_grammar_matches_the_constrained_target(spread_pair, setup):  # noqa: F811
    target, draft, tokenizer = spread_pair
    constraint = compile_constraint("regex", DIST_GRAMMAR)
    vocab = target.lm_head.weight.shape[0]
    ids = tokenizer.encode("Hello")
    joint = _exact_joint(target, GrammarState(constraint, tokenizer, vocab), ids, 3)
    draft_vocab = None
    if setup == "restricted":
        draft_vocab = DraftVocab(vocab_size=vocab, size=8)
        draft_vocab.observe(tokenizer.encode("{abcd}") * 5)
    samples, grammar_proposed = [], 0
    for seed in range(N):
        req = GenerationRequest(
            prompt="Hello", raw=True, max_tokens=4, constraint=constraint,
            draft_tokens=2 if setup == "draft2" else None,
            sampling=SamplingParams(**PARAMS, seed=seed),
        )  # fmt: skip
        *_, summary = generate(target, draft, tokenizer, req, SPEC, draft_vocab=draft_vocab)
        samples.append(tuple(summary.completion_token_ids[:3]))
        grammar_proposed += summary.grammar_proposed
    cells = sorted(set(joint) | set(samples))
    observed = [sum(1 for s in samples if s == c) for c in cells]
    expected = [N * joint.get(c, 0.0) for c in cells]
    assert all(c in joint for c in set(samples)), "an output the grammar forbids"
    assert chi_square_p_value(observed, expected)[0] > 1e-3
    if setup != "draft2":
        assert grammar_proposed >= N  # the forced "{" at least


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"json_schema": "{not json"}, "json_schema"),
        ({"json_schema": '{"type": "bogus"}'}, "json_schema"),
        ({"json_schema": "[1, 2]"}, "json_schema"),
        ({"regex": "a(b"}, "regex"),
        ({"regex": ""}, "regex"),
        ({"lark": "start: missing_rule"}, "lark"),
        ({"lark": 5}, "lark"),
        ({"json_object": "yes"}, "json_object"),
        ({"regex": "a", "lark": 'start: "a"'}, "regex"),
        ({"json_object": True, "mode": "fast"}, "mode"),
    ],
)
def test_bad_constraints_name_the_field(fields, field):
    with pytest.raises(InvalidRequestError) as err:
        generation_request(Config(), "r", prompt="hi", **fields)
    assert err.value.field == field


def test_structured_output_runs_detailed_when_the_default_is_fast():
    base = Config()
    config = dataclasses.replace(
        base, speculation=dataclasses.replace(base.speculation, mode="fast")
    )
    req = generation_request(config, "r", prompt="hi", json_object=True)
    assert req.mode == "detailed" and req.constraint is not None
    assert generation_request(config, "r", prompt="hi").mode == "fast"
    assert generation_request(config, "r", prompt="hi", json_object=False).constraint is None
