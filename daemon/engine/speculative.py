"""Detailed mode: our own speculative decoding loop with token-level tracking.

One `next()` does one prefill chunk or one step. A step with K > 0 drafts K tokens, verifies
all K + 1 positions with one target forward, decides acceptance on device (sampling.py) and
syncs with the host once. A step with K = 0 is a plain target pass. Each step's plan is made
as soon as its tokens are known; when the next step is plain, its pass is queued then
(mx.async_eval) and computes while the event goes out, as mlx-lm's generate_step overlaps its
steps. A speculative step is never preceded by a queued pass: its verify runs seq[-1] and the
proposals in one pass (two passes, 1 and K tokens, cost ~1 pass more on a CPU).

Cache bookkeeping. With `seq` the prompt plus every emitted token, the target cache always
holds seq[:-1] (the last token is the next step's input). The draft cache holds seq[:draft_len]
and is fed seq[draft_len:] before proposing: normally one token, two after a step where every
proposal was accepted (the draft never ran on its own last proposal, the "bonus" case), more
after plain steps while adaptive K sat at 0. After verification both caches are trimmed back
to the accepted prefix. An unadapted self-draft has no cache of its own: its layers are the
target's first layers, so it runs on theirs (fed seq[-1], its k proposal positions trimmed
before the verify pass writes them again).

Structured output (a request with a `constraint`, engine/grammar.py). Every target row that
decides a token is masked with the grammar's state at its position, before temperature, top-k
and top-p, so the output is exactly the constrained target's, greedy or sampled; the draft's
rows are masked the same way (through its restricted head's ids), so its proposals are legal,
and it stops proposing where its head has no legal token or after an end token. History's and
the grammar's own proposals (the run it forces) are verified as point masses. The matcher runs
ahead over a step's proposals for their masks, comes back, and consumes what was emitted (before
the next plain pass is queued: its row's mask needs this step's tokens), and where the
grammar is complete and allows only the end token, that token is emitted without a pass.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
import structlog
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from speclora.daemon.engine.adaptive import AcceptanceMemory
from speclora.daemon.engine.controller import (
    PLAIN,
    HistoryMemory,
    ProposalSource,
    StepController,
    StepPlan,
    make_controller,
)
from speclora.daemon.engine.costs import StepPrices, default_prices
from speclora.daemon.engine.draft_vocab import DraftHead, DraftVocab, GreedyHead, model_parts
from speclora.daemon.engine.events import (
    EngineEvent,
    ForwardPass,
    GenerationRequest,
    PrefillProgress,
    SamplingParams,
    StepEvent,
    StepTrace,
)
from speclora.daemon.engine.grammar import GrammarState
from speclora.daemon.engine.output import CompletionTracker
from speclora.daemon.engine.prompt_cache import PromptCache, Reused
from speclora.daemon.engine.sampling import (
    GreedyRows,
    filtered_logits,
    greedy_rows,
    greedy_verdict,
    make_key,
    point_mass_verdict,
    sample,
    speculative_verdict,
    split_key,
)

log = structlog.get_logger(__name__)


@dataclass
class _Proposal:
    tokens: mx.array  # (K,) the draft's proposals
    draft_probs: mx.array  # (K,) q(x_i) (untempered softmax at T = 0)
    q: mx.array | None  # (K, V) the distributions they were drawn from (T > 0 only)
    fed: int = -1  # proposals the draft ran on (K - 1 unless it stopped early; -1 = K - 1)
    masks: np.ndarray | None = None  # (K + 1, V) the grammar's mask at each verified row


@dataclass(frozen=True)
class _StepResult:
    proposed: list[int]
    accepted: int
    emitted: list[int]  # accepted proposals + the correction or bonus token
    target_probs: list[float]
    draft_probs: list[float]


def _masked(logits: mx.array, allowed: np.ndarray | mx.array) -> mx.array:
    """Logits with the tokens a grammar forbids at -inf (rows and mask of the same width)."""
    mask = allowed if isinstance(allowed, mx.array) else mx.array(allowed)
    return mx.where(mask, logits, mx.array(float("-inf"), logits.dtype))


def _head_mask(allowed: mx.array, ids: mx.array | None, width: int) -> mx.array:
    """A full-vocabulary mask seen through a draft head: its ids, or its own width."""
    if ids is not None:
        return allowed[ids]
    vocab = allowed.shape[0]
    if width <= vocab:
        return allowed[:width]
    return mx.concatenate([allowed, mx.zeros((width - vocab,), mx.bool_)])


def _to_vocab(row: mx.array, ids: mx.array | None, vocab: int) -> mx.array:
    """A draft distribution over the target's vocabulary (scatter a restricted head's N probs;
    pad or cut a draft whose embedding is sized differently)."""
    if ids is not None:
        return mx.zeros((vocab,), row.dtype).at[ids].add(row)
    if row.shape[-1] < vocab:
        return mx.concatenate([row, mx.zeros((vocab - row.shape[-1],), row.dtype)])
    return row[:vocab]


class _Decoder:
    """The mutable state of one detailed generation: caches, sequence, PRNG key."""

    def __init__(
        self,
        target: Any,
        draft: Any | None,
        params: SamplingParams,
        prompt: list[int],
        draft_vocab: DraftVocab | None,
        reused: Reused | None = None,
        draft_key: Any = None,
    ):
        self.grammar: GrammarState | None = None  # set by detailed_steps for structured output
        self.target = target
        self.target_parts = model_parts(target)
        self.params = params
        self.key = make_key(params.seed)
        self.seq = list(prompt)
        # Caches from the prompt cache, already holding seq[:target_len] (and seq[:draft_len]),
        # or fresh ones.
        self.target_cache = reused.cache if reused else make_prompt_cache(target)
        self.target_len = reused.n if reused else 0
        self.draft_key = draft_key  # names the draft's weights, for the prompt cache
        self.draft = draft
        self.draft_parts = model_parts(draft) if draft is not None else None
        # An unadapted self-draft computes exactly the target's first layers, so it uses the
        # target's cache for them: no draft prefill, no catch-up after plain steps, no second
        # copy of those keys and values. (A swap mid-request keeps the choice made here; the
        # proposals then mix old and new weights until the request ends, still lossless.)
        shared = self._shared_draft_cache()
        self.shares_cache = shared is not None
        self.draft_len = 0
        if shared is not None:
            self.draft_cache = shared
        elif draft is not None and reused and reused.draft_cache is not None:
            self.draft_cache, self.draft_len = reused.draft_cache, reused.draft_n
        elif draft is not None:
            self.draft_cache = make_prompt_cache(draft)
        else:
            self.draft_cache = None
        self.head = (
            DraftHead(self.draft_parts, draft_vocab, extra=prompt) if self.draft_parts else None
        )
        self.vocab: int | None = None  # the target's logits width, learned on the first pass
        # A queued target pass over seq[-1] (lazy): its logits row and the token sampled from it.
        # The next step uses it whatever it is: a plain step takes the token, a speculative one
        # verifies its proposals against the row, so a plain step's pipelining is never wasted.
        self.lookahead: tuple[mx.array, mx.array] | None = None
        self.awaiting_pass = False  # stopped at a ForwardPass: a step is half done
        self.last_width = 0  # tokens of its last target pass (its row in a shared forward)

    @property
    def own_draft_cache(self) -> bool:
        """A draft that keeps a cache of its own (fed, trimmed and stored apart from the target's)."""
        return self.draft_cache is not None and not self.shares_cache

    def _shared_draft_cache(self) -> list[Any] | None:
        """The target's caches of the layers the draft is made of, or None if it is not."""
        if self.draft_parts is None or not self.draft_parts.is_prefix_of(self.target_parts):
            return None
        shared = self.target_cache[: len(self.draft_parts.model.model.layers)]
        return shared if can_trim_prompt_cache(shared) else None

    def _next_key(self) -> mx.array | None:
        if self.params.greedy:
            return None  # argmax needs no randomness; skip the split ops
        self.key, sub = split_key(self.key)
        return sub

    # ------------------------------------------------------------------ prefill

    def prefilled(self, end: int) -> int:
        """How much of seq[:end] both caches hold."""
        return min(self.target_len, self.draft_len if self.own_draft_cache else end, end)

    def prefill(self, end: int, chunk: int) -> None:
        """Run the next chunk of seq[:end] through each trunk that is behind (no logits needed).
        The target may start further on than a draft with its own cache (a prompt cache hit)."""
        states = []
        if self.target_len < end:
            stop = min(end, self.target_len + chunk)
            self.target_parts.trunk(
                mx.array(self.seq[self.target_len : stop], mx.uint32), self.target_cache
            )
            self.target_len = stop
            states += [c.state for c in self.target_cache]
        if self.own_draft_cache and self.draft_len < end:
            stop = min(end, self.draft_len + chunk)
            self.draft_parts.trunk(
                mx.array(self.seq[self.draft_len : stop], mx.uint32), self.draft_cache
            )
            self.draft_len = stop
            states += [c.state for c in self.draft_cache]
        mx.eval(states)

    # ------------------------------------------------------------------ plain steps

    def _target_pass(self, tokens: mx.array) -> Generator[ForwardPass, mx.array, mx.array]:
        """The target's (len(tokens), V) logits over `tokens` on this request's cache."""
        return (yield from self._forward(ForwardPass(self.target, tokens, self.target_cache)))

    def _forward(self, request: ForwardPass) -> Generator[ForwardPass, mx.array, mx.array]:
        """A forward asked of whoever drives the generation (batch.py), so that concurrent
        requests share it."""
        self.awaiting_pass = True
        answer = yield request
        self.awaiting_pass = False
        if request.model is self.target:
            self.last_width = request.width
        return answer

    def _plain_pass(
        self, token: mx.array
    ) -> Generator[ForwardPass, mx.array, tuple[mx.array, mx.array]]:
        logits = (yield from self._target_pass(token.reshape(1)))[-1]
        if self.grammar is not None:
            logits = _masked(logits, self.grammar.allowed())
        return logits, sample(logits, self.params, self._next_key())

    def plain_step(self) -> Generator[ForwardPass, mx.array, int]:
        """One target pass, one token: the queued one (queue_plain) if there is one."""
        if self.lookahead is not None:
            (_, token), self.lookahead = self.lookahead, None
        else:
            _, token = yield from self._plain_pass(mx.array([self.seq[-1]], mx.uint32))
        value = int(token.item())
        self.seq.append(value)
        self.target_len = len(self.seq) - 1
        return value

    def queue_plain(self) -> Generator[ForwardPass, mx.array, None]:
        """Queue the next step's pass (mx.async_eval) once the plan says it is a plain one, so
        that it computes while this step's event goes out. Only then: a speculative step's
        verify covers seq[-1] and its proposals in one pass, which on a CPU costs far less
        than a queued pass over seq[-1] and a second one over the proposals. The cache then
        holds one more position than target_len until the pass is used or dropped."""
        grammar = self.grammar
        if grammar is not None and (grammar.dead() or grammar.only() == grammar.eos):
            return  # the next step needs no pass
        if self.lookahead is None:
            self.lookahead = yield from self._plain_pass(mx.array([self.seq[-1]], mx.uint32))
            mx.async_eval(self.lookahead[1])

    def drop_lookahead(self) -> None:
        """Undo a queued plain pass that will not be used (the generation is ending)."""
        if self.lookahead is not None:
            self.lookahead = None
            trim_prompt_cache(self.target_cache, 1)

    # ------------------------------------------------------------------ speculative steps

    def _propose(self, k: int) -> Generator[ForwardPass, mx.array, _Proposal]:
        assert self.head is not None and self.draft_cache is not None
        greedy = self.params.greedy
        if self.shares_cache:
            feed = mx.array(self.seq[-1:], mx.uint32)  # the shared layers hold seq[:-1]
        else:
            feed = mx.array(self.seq[self.draft_len :], mx.uint32)
            self.draft_len = len(self.seq)
        grammar = self.grammar
        tokens, probs, rows, masks = [], [], [], []
        runs, fed = 0, k - 1
        # A splittable draft's passes go to the driver too (shared with other requests').
        ids, project = self.head.projection() if self.draft_parts.splittable else (None, None)
        for i in range(k):
            if project is not None:
                draft_pass = ForwardPass(self.draft, feed, self.draft_cache, head=project)
                logits = yield from self._forward(draft_pass)
            else:
                ids, logits = self.head.logits(feed, self.draft_cache)
            runs += 1
            if grammar is not None:
                allowed = mx.array(grammar.allowed())
                legal = _head_mask(allowed, ids, logits.shape[-1])
                if not mx.any(legal).item():  # no legal token in the draft's head
                    fed = i
                    break
                masks.append(grammar.allowed())
                logits = _masked(logits, legal)
            if greedy:
                choice = mx.argmax(logits, axis=-1)
                q_row = mx.softmax(logits.astype(mx.float32), axis=-1)
            else:
                shaped = filtered_logits(logits, self.params)
                q_row = mx.softmax(shaped, axis=-1)
                choice = mx.random.categorical(shaped, key=self._next_key())
            probs.append(q_row[choice])
            token = ids[choice] if ids is not None else choice
            token = token.astype(mx.uint32)
            tokens.append(token)
            if not greedy:
                assert self.vocab is not None
                rows.append(_to_vocab(q_row, ids, self.vocab))
            mx.async_eval(token)
            if grammar is not None:
                value = int(token.item())
                grammar.push(value)
                if value == grammar.eos:  # nothing follows an end token
                    fed = i
                    break
            if i < k - 1:
                feed = token.reshape(1)
        if self.shares_cache:
            # The verify pass writes these positions of the shared layers again, its own way.
            trim_prompt_cache(self.draft_cache, runs)
        if grammar is not None:
            masks.append(grammar.allowed())
            grammar.pop(len(tokens))
        if not tokens:
            return _Proposal(mx.zeros((0,), mx.uint32), mx.zeros((0,)), None, fed=0)
        return _Proposal(
            tokens=mx.stack(tokens),
            draft_probs=mx.stack(probs),
            q=mx.stack(rows) if rows else None,
            fed=fed if grammar is not None else k - 1,
            masks=np.stack(masks) if grammar is not None else None,
        )

    def _verify_rows(
        self, proposals: mx.array, following: mx.array | None
    ) -> Generator[ForwardPass, Any, mx.array | GreedyRows]:
        """The target's K + 1 rows after seq[-1] and after each proposal, in one pass: its
        (K + 1, V) logits, or, given each row's next token (`following`: T = 0, no grammar),
        their GreedyRows, so that no (K + 1, V) logits are kept. (No plain pass is queued
        before a speculative step: queue_plain runs only when the next step is plain.)"""
        assert self.lookahead is None
        verify_in = mx.concatenate([mx.array([self.seq[-1]], mx.uint32), proposals])
        if following is None:
            return (yield from self._target_pass(verify_in))
        head = GreedyHead(self.target_parts, following)
        return (
            yield from self._forward(ForwardPass(self.target, verify_in, self.target_cache, head))
        )

    def _verify(
        self,
        proposals: mx.array,
        confidence: mx.array,
        q: mx.array | None,
        point_mass: bool,
        masks: np.ndarray | None = None,
    ) -> Generator[ForwardPass, Any, tuple[list[int], int, list[int], Any]]:
        """Verify k proposals; the target cache keeps seq through the accepted ones. Returns
        (proposed, accepted, emitted, verdict). `masks`: the grammar's mask of each row."""
        k = proposals.shape[0]
        greedy = self.params.greedy
        # Each verified row's next token: proposal i follows row i (the last row has none).
        following = mx.concatenate([proposals, mx.zeros((1,), mx.uint32)]) if greedy else None
        # The pass answers with GreedyRows where the trunk can run alone and no mask applies.
        reduced = greedy and masks is None and self.target_parts.splittable
        rows = yield from self._verify_rows(proposals, following if reduced else None)
        if masks is not None:
            rows = _masked(rows, masks)
        if greedy:
            if not reduced:
                rows = greedy_rows(rows, following)
            verdict = greedy_verdict(rows, proposals, confidence)
        else:
            p = mx.softmax(filtered_logits(rows, self.params), axis=-1)
            if point_mass:
                verdict = point_mass_verdict(p, proposals, self._next_key())
            else:
                assert q is not None
                verdict = speculative_verdict(p, q, proposals, self._next_key())
        mx.eval(proposals, verdict.accepted, verdict.next_token, verdict.target_probs)
        proposed = proposals.tolist()
        n = int(verdict.accepted.item())
        emitted = proposed[:n] + [int(verdict.next_token.item())]
        # Target cache: seq + k proposals; keep through the n accepted.
        trim_prompt_cache(self.target_cache, k - n)
        return proposed, n, emitted, verdict

    def speculative_step(self, k: int) -> Generator[ForwardPass, mx.array, _StepResult]:
        """Draft k, verify k + 1 in one target pass, rewind both caches to the accepted prefix.
        Under a grammar the draft may propose fewer (none: the step is a plain one)."""
        if self.vocab is None:
            self.vocab = self._vocab_width()
        proposal = yield from self._propose(k)
        k = proposal.tokens.shape[0]
        if k == 0:
            token = yield from self.plain_step()
            return _StepResult(
                proposed=[], accepted=0, emitted=[token], target_probs=[], draft_probs=[]
            )
        proposed, n, emitted, verdict = yield from self._verify(
            proposal.tokens,
            proposal.draft_probs,
            proposal.q,
            point_mass=False,
            masks=proposal.masks,
        )
        if self.own_draft_cache:  # (a shared draft cache was trimmed with the target's)
            # Draft cache: ran on seq and proposals 1..fed (fed = k - 1 unless it stopped
            # early); keep through the n accepted.
            fed = proposal.fed
            keep = min(n, fed)
            if keep < fed:
                trim_prompt_cache(self.draft_cache, fed - keep)
            self.draft_len = len(self.seq) + keep
        return self._advance(proposed, n, emitted, verdict)

    def history_step(
        self, tokens: Sequence[int], confidence: Sequence[float]
    ) -> Generator[ForwardPass, mx.array, _StepResult]:
        """Verify a deterministic proposal (history's, or the run a grammar forces: no draft
        pass). A draft with a cache of its own falls behind and catches up when it next
        proposes."""
        masks = self.grammar.masks(tokens) if self.grammar is not None else None
        proposed, n, emitted, verdict = yield from self._verify(
            mx.array(list(tokens), mx.uint32),
            mx.array(list(confidence), mx.float32),
            None,
            point_mass=True,
            masks=masks,
        )
        return self._advance(proposed, n, emitted, verdict, confidence=list(confidence))

    def _advance(
        self,
        proposed: list[int],
        n: int,
        emitted: list[int],
        verdict: Any,
        confidence: list[float] | None = None,
    ) -> _StepResult:
        self.seq.extend(emitted)
        self.target_len = len(self.seq) - 1
        return _StepResult(
            proposed=proposed,
            accepted=n,
            emitted=emitted,
            target_probs=verdict.target_probs.tolist(),
            draft_probs=confidence if confidence is not None else verdict.draft_probs.tolist(),
        )

    def _vocab_width(self) -> int:
        rows = self.target_parts.vocab_rows()
        if rows is not None:
            return rows
        cache = make_prompt_cache(self.target)
        return int(self.target(mx.array([[0]], mx.uint32), cache=cache).shape[-1])

    def release(self, keep_in: PromptCache | None = None) -> None:
        """Drop any queued work and both caches (they are this request's alone), handing them
        to `keep_in` for later requests that start with the same tokens."""
        if keep_in is not None:
            self.drop_lookahead()
            own = self.own_draft_cache
            keep_in.insert(
                self.target,
                self.seq[: self.target_len],
                self.target_cache,
                draft=(self.draft_key, self.draft_cache, self.draft_len) if own else None,
            )
            self.target_cache, self.draft_cache = [], None
        self.lookahead = None
        for cache in (self.target_cache, self.draft_cache):
            if cache:
                cache.clear()


def detailed_steps(
    target: Any,
    draft: Any | None,
    request: GenerationRequest,
    spec: Any,
    tracker: CompletionTracker,
    *,
    draft_vocab: DraftVocab | None = None,
    prices: StepPrices | None = None,
    memory: AcceptanceMemory | None = None,
    history: ProposalSource | None = None,
    history_memory: HistoryMemory | None = None,
    history_config: Any | None = None,
    prompt_cache: PromptCache | None = None,
    draft_tag: str = "",
    tokenizer: Any = None,
    batch_width: Any | None = None,
) -> Generator[EngineEvent | ForwardPass, mx.array | None, None]:
    """The detailed-mode event generator (see module docstring). Its target and draft passes
    are yielded as `ForwardPass`es for the driver to answer (engine/batch.py,
    output.Generation). `tracker` is filled in as it goes, so a caller can summarise a cancelled generation. With `prompt_cache`, the prompt's
    longest stored prefix is not prefilled again, and the caches are stored at the end; a
    draft cache is reused only under the same `draft_tag` (the adapter version: a swap changes
    the draft's weights in place). `history` proposes continuations when K is adaptive (the
    controller, controller.py, picks the source per step); a fixed K uses the draft alone. A
    request's `constraint` needs `tokenizer` (the grammar's matcher works on its tokens)."""
    # The request's K, else the configured default; None means adaptive.
    draft_tokens = request.draft_tokens if request.draft_tokens is not None else spec.draft_tokens
    if request.sampling.seed is not None and not request.sampling.greedy:
        # A seeded sample must not depend on earlier requests, nor on concurrent ones.
        memory = history_memory = batch_width = None
    use_draft = draft is not None and draft_tokens != 0
    history = history if draft_tokens is None and request.use_history else None
    prompt = list(tracker.prompt_ids)
    # The prompt's last token goes in with the first step, so the caches take the rest.
    body = len(prompt) - 1
    draft = draft if use_draft else None
    draft_key = (id(draft), draft_tag) if draft is not None else None
    reused = prompt_cache.fetch(target, prompt, draft_key) if prompt_cache else None
    tracker.cached_prompt_tokens = reused.n if reused else 0
    decoder = _Decoder(
        target, draft, request.sampling, prompt, draft_vocab, reused, draft_key=draft_key
    )
    grammar = None
    if request.constraint is not None:
        decoder.vocab = decoder._vocab_width()
        try:
            grammar = GrammarState(request.constraint, tokenizer, decoder.vocab)
        except BaseException:
            decoder.release()
            raise
        decoder.grammar = grammar
    controller = make_controller(
        draft_tokens,
        spec,
        prices or default_prices(),
        has_draft=use_draft,
        history=history,
        draft_alpha=memory.alpha if memory is not None else None,
        history_calibration=history_memory.calibration() if history_memory is not None else None,
        history_config=history_config,
        grammar=grammar,
    )
    # The grammar's forced runs are proposals too, under an adaptive controller.
    speculate = use_draft or history is not None or (grammar is not None and draft_tokens is None)
    clean = True  # False once an error may have left the caches half-updated
    try:
        while decoder.prefilled(body) < body:
            decoder.prefill(body, spec.prefill_chunk)
            done = decoder.prefilled(body)
            yield PrefillProgress(done=len(prompt) if done == body else done, total=len(prompt))
        tracker.prefill_done = time.perf_counter()
        if tracker.remaining <= 0:
            tracker.finish("length")

        plan: StepPlan = controller.plan(tracker.remaining - 1) if speculate else PLAIN
        while not tracker.finished:
            before = len(tracker.ids)
            if grammar is not None and grammar.dead():  # no token can continue
                yield StepEvent(chunk=tracker.finish("grammar_incomplete"))
                break
            if grammar is not None and grammar.only() == grammar.eos:
                # The grammar is complete and allows only the end token: the constrained
                # target's choice is certain, so it needs no pass.
                eos = (grammar.eos,)
                tracker.count_step("grammar", 1, 1)
                text = tracker.add(eos, 1, "grammar")
                yield StepEvent(
                    chunk=text, trace=StepTrace(1, eos, (1.0,), (1.0,), 1, eos, None, "grammar")
                )
                continue
            if plan.k <= 0:
                # The pass queue_plain queued after the last plan, if any, else one now.
                token = yield from decoder.plain_step()
                emitted, accepted = [token], 0
                trace = StepTrace(0, (), (), (), 0, (token,), None, source="target")
            else:
                if plan.source in ("history", "grammar"):
                    step = yield from decoder.history_step(plan.tokens, plan.confidence)
                else:
                    step = yield from decoder.speculative_step(plan.k)
                    if len(step.proposed) < plan.k:  # a grammar stopped the draft early
                        plan = dataclasses.replace(plan, k=len(step.proposed))
                emitted, accepted = step.emitted, step.accepted
                trace = StepTrace(
                    k=plan.k,
                    proposed=tuple(step.proposed),
                    draft_probs=tuple(step.draft_probs),
                    target_probs=tuple(step.target_probs),
                    accepted=accepted,
                    emitted=tuple(emitted),
                    first_rejection=accepted if accepted < plan.k else None,
                    source=plan.source if plan.k else "target",
                )
            controller.update(plan, accepted, emitted)
            if history is not None:
                history.extend(emitted)
            tracker.count_step(plan.source, plan.k, accepted)
            tracker.target_passes += 1
            text = tracker.add(emitted, accepted, plan.source)
            if grammar is not None:
                grammar.advance(tracker.ids[before:])
            rejected = trace.first_rejection is not None and before + accepted < len(tracker.ids)
            if rejected and plan.source == "draft":  # what the LoRA loop learns from
                tracker.rejection_positions.append(before + accepted)
            if not tracker.finished:
                if batch_width is not None and isinstance(controller, StepController):
                    controller.price_for_batch(batch_width.others(decoder.last_width))
                plan = controller.plan(tracker.remaining - 1) if speculate else PLAIN
                if plan.k <= 0:
                    yield from decoder.queue_plain()
            yield StepEvent(chunk=text, trace=trace)
        decoder.drop_lookahead()
        if grammar is not None and tracker.finish_reason == "length" and not grammar.accepting():
            tracker.finish_reason = "grammar_incomplete"
        tracker.end = time.perf_counter()
        if memory is not None and tracker.proposed["draft"]:
            memory.record(tracker.accepted["draft"], len(tracker.rejection_positions))
        if history_memory is not None and isinstance(controller, StepController):
            history_memory.record(controller.history_accepted, controller.history_tested)
        summary = tracker.summary()
        log.debug(
            "generation_finished",
            request_id=request.request_id,
            mode="detailed",
            tokens=summary.completion_tokens,
            acceptance=round(summary.acceptance_rate, 3),
            draft_acceptance=round(summary.draft_acceptance_rate, 3),
            history_acceptance=round(summary.history_acceptance_rate, 3),
            tokens_per_step=round(summary.tokens_per_step, 2),
            finish_reason=summary.finish_reason,
        )
        yield summary
    except GeneratorExit:  # closed at a yield: between steps, the caches are consistent
        clean = not decoder.awaiting_pass  # (inside a step, waiting for its pass, they are not)
        raise
    except BaseException:
        clean = False
        raise
    finally:
        decoder.release(keep_in=prompt_cache if clean else None)
