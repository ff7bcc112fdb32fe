"""Model trunk / output head split, and the cheap draft head over a restricted vocabulary.

Two levers on cost live here:

- Forwards whose logits are not needed (prefill, draft catch-up) run only the trunk: for
  SmolLM2-135M the tied 49152 x 576 LM head is a large share of a pass, and mlx-lm's model
  call computes it for every position.
- The draft can score only the N tokens the target generates most often (a frequency-ranked
  draft vocabulary). Proposals then come only from that set, but verification uses the
  target's full vocabulary, so output stays lossless at every temperature: q is simply zero
  outside the set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import structlog
from mlx.utils import tree_flatten
from speclora.daemon.engine.sampling import GreedyRows, greedy_rows

log = structlog.get_logger(__name__)

# Model classes whose __call__ is exactly `head(self.model(inputs, cache))`, checked against
# mlx-lm's sources; anything else goes through the model's own __call__.
_SPLITTABLE = frozenset({"llama", "qwen2", "qwen3", "mistral"})
# A T = 0 verify pass's head runs in vocabulary slices whose logits stay under this many bytes
# (GreedyHead): 8 rows verifying 25 tokens each would hold 37.5 MiB of logits on a 49k vocabulary
# and 115 MiB on a 151k one. Smaller products than this run whole, as before.
HEAD_SLICE_BYTES = 8 << 20
HEAD_SLICE_ALIGN = 1024
# The head layers whose product _head_slice reproduces on a slice of their rows.
_SLICEABLE_HEADS = (nn.Linear, nn.Embedding, nn.QuantizedLinear, nn.QuantizedEmbedding)


@dataclass(frozen=True)
class ModelParts:
    """Callables for one model: trunk(tokens, cache) -> hidden; head(hidden) -> logits."""

    model: Any
    splittable: bool

    def trunk(self, tokens: mx.array, cache: list[Any]) -> mx.array | None:
        """Advance the cache over `tokens` (1-D). Returns hidden states, or None when the model
        cannot be split (then the full model ran and its logits were discarded)."""
        if self.splittable:
            return self.model.model(tokens[None], cache)
        self.model(tokens[None], cache=cache)
        return None

    def head_layer(self) -> Any | None:
        if not self.splittable:
            return None
        m = self.model
        layer = m.model.embed_tokens if m.args.tie_word_embeddings else m.lm_head
        if not hasattr(layer, "weight") or hasattr(layer, "lora_a"):
            return None  # e.g. an adapter wraps the head: keep the model's own path
        return layer

    def vocab_rows(self) -> int | None:
        """Rows of the output projection (the logits' width), or None if unknown."""
        layer = self.head_layer()
        return None if layer is None else int(layer.weight.shape[0])

    def head_rows(self, ids: mx.array) -> mx.array | None:
        """The (len(ids), D) rows of the output projection for `ids`, dequantizing only those
        rows of a quantized head; None when the model cannot be split."""
        layer = self.head_layer()
        if layer is None:
            return None
        if isinstance(layer, nn.QuantizedEmbedding | nn.QuantizedLinear):
            return mx.dequantize(
                mx.take(layer.weight, ids, axis=0),
                mx.take(layer.scales, ids, axis=0),
                mx.take(layer.biases, ids, axis=0),
                layer.group_size,
                layer.bits,
            )
        return mx.take(layer.weight, ids, axis=0)

    def head(self, hidden: mx.array) -> mx.array:
        m = self.model
        if m.args.tie_word_embeddings:
            return m.model.embed_tokens.as_linear(hidden)
        return m.lm_head(hidden)

    def greedy_rows(self, hidden: mx.array, next_tokens: mx.array) -> GreedyRows:
        """The head's GreedyRows for (n, D) hidden states without (n, V) logits at once: when
        they would pass HEAD_SLICE_BYTES the head runs a slice of the vocabulary at a time and
        each slice is reduced (argmax, its logit, logsumexp, the next token's logit) before the
        next. A slice is the same product on fewer output rows (BLAS may sum it in another order
        in the last bits, as in a wider batch); argmax keeps the first of equal maxima, as
        mx.argmax does. A head it cannot slice, or a product under the limit, runs whole."""
        layer = self.head_layer()
        n = max(1, int(hidden.shape[0]))
        width = HEAD_SLICE_BYTES // (n * hidden.dtype.size) // HEAD_SLICE_ALIGN * HEAD_SLICE_ALIGN
        if not isinstance(layer, _SLICEABLE_HEADS) or width >= int(layer.weight.shape[0]):
            return greedy_rows(self.head(hidden[None])[0], next_tokens)
        vocab = int(layer.weight.shape[0])
        width = max(width, HEAD_SLICE_ALIGN)
        maxima, choices, lses, picked = [], [], [], mx.zeros((n,), mx.float32)
        for start in range(0, vocab, width):
            stop = min(vocab, start + width)
            logits = _head_slice(layer, hidden, start, stop)
            choice = mx.argmax(logits, axis=-1)
            top = mx.take_along_axis(logits, choice[:, None], axis=-1)[:, 0]
            inside = (next_tokens >= start) & (next_tokens < stop)
            at = mx.clip(next_tokens.astype(mx.int32) - start, 0, stop - start - 1)
            here = mx.take_along_axis(logits, at[:, None], axis=-1)[:, 0]
            picked = mx.where(inside, here.astype(mx.float32), picked)
            step = [top, choice + start, mx.logsumexp(logits.astype(mx.float32), axis=-1), picked]
            mx.eval(step)  # reduce this slice before the next slice's product exists
            maxima.append(step[0])
            choices.append(step[1])
            lses.append(step[2])
        best = mx.argmax(mx.stack(maxima, axis=-1), axis=-1)  # the first slice with the maximum
        choice = mx.take_along_axis(mx.stack(choices, axis=-1), best[:, None], axis=-1)[:, 0]
        lse = mx.logsumexp(mx.stack(lses, axis=-1), axis=-1)
        return GreedyRows(choice.astype(mx.uint32), picked - lse)

    def is_prefix_of(self, other: ModelParts) -> bool:
        """True when this model's whole trunk is `other`'s embedding and first layers, array for
        array, under the same settings (an unadapted self-draft). Its keys and values at every
        position are then `other`'s for those layers, so the two can share that part of a cache.
        An adapter (LoRA wraps the linears) or a separately loaded model never qualifies."""
        if not (self.splittable and other.splittable) or type(self.model) is not type(other.model):
            return False
        mine, theirs = self.model.model, other.model.model
        if len(mine.layers) > len(theirs.layers):
            return False
        settings = ("num_hidden_layers", "layer_types")
        a = {k: v for k, v in vars(self.model.args).items() if k not in settings}
        b = {k: v for k, v in vars(other.model.args).items() if k not in settings}
        if a != b:
            return False
        depth = len(mine.layers)
        pairs = [(mine.embed_tokens, theirs.embed_tokens)]
        pairs += zip(mine.layers, theirs.layers[:depth], strict=True)
        for x, y in pairs:
            px, py = tree_flatten(x.parameters()), tree_flatten(y.parameters())
            if [k for k, _ in px] != [k for k, _ in py]:
                return False
            if any(vx is not vy for (_, vx), (_, vy) in zip(px, py, strict=True)):
                return False
        return True

    def last_logits(self, tokens: mx.array, cache: list[Any]) -> mx.array:
        """Advance the cache over `tokens` and return the logits (V,) after the last one,
        computing the output head for that position only."""
        if self.splittable:
            hidden = self.model.model(tokens[None], cache)
            if tokens.shape[0] > 1:
                hidden = hidden[:, -1:, :]
            return self.head(hidden)[0, -1]
        return self.model(tokens[None], cache=cache)[0, -1]


def _head_slice(layer: Any, hidden: mx.array, start: int, stop: int) -> mx.array:
    """Logits of vocabulary rows start..stop: the head layer's own product on those rows."""
    if isinstance(layer, nn.QuantizedEmbedding | nn.QuantizedLinear):
        biases = layer.get("biases")
        out = mx.quantized_matmul(
            hidden,
            layer["weight"][start:stop],
            scales=layer["scales"][start:stop],
            biases=None if biases is None else biases[start:stop],
            transpose=True,
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
        )
        return out + layer["bias"][start:stop] if "bias" in layer else out
    weight = layer["weight"][start:stop]
    if "bias" in layer:
        return mx.addmm(layer["bias"][start:stop], hidden, weight.T)
    return hidden @ weight.T


@dataclass(frozen=True)
class GreedyHead:
    """A target pass's head at T = 0: it answers with GreedyRows (sampling.py), not logits.
    Row i's next token is the pass's token i + 1; batched passes share one head product
    (batch.py)."""

    parts: ModelParts
    next_tokens: mx.array

    def __call__(self, hidden: mx.array) -> GreedyRows:
        return self.parts.greedy_rows(hidden, self.next_tokens)


def model_parts(model: Any) -> ModelParts:
    kind = getattr(model, "model_type", None) or getattr(
        getattr(model, "args", None), "model_type", ""
    )
    splittable = (
        kind in _SPLITTABLE
        and hasattr(model, "model")
        and hasattr(model.model, "embed_tokens")
        and hasattr(model, "args")
    )
    return ModelParts(model, splittable)


@dataclass
class DraftVocab:
    """Token frequencies of target output; its top N ids form the draft's restricted head.

    Counts start from a prior that favours low ids (byte-level BPE assigns ids roughly in merge
    order, so frequent pieces come first) and the tokenizer's special tokens; every completion
    the target produces then adds its tokens. The worker owns one per model pair and feeds it
    completions; `generate()` takes it as `draft_vocab`.

    The (N, D) head matrix is built once and shared by every request: a copy per request cost
    N x D floats each (9 MiB for SmolLM2), which four concurrent streams turned into the
    daemon's memory peak. The set is re-ranked after `refresh_every` observed tokens, and the
    matrix rebuilt only when its membership changed.
    """

    vocab_size: int
    size: int
    always: tuple[int, ...] = ()  # ids always in the set (EOS and friends)
    refresh_every: int = 1024  # observed tokens between re-rankings (a stale set loses little)
    counts: np.ndarray = field(init=False, repr=False)
    _pending: int = field(default=0, init=False, repr=False)
    _ids: mx.array | None = field(default=None, init=False, repr=False)
    _head: tuple[mx.array, Any, mx.array] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # Tiny decreasing prior: breaks ties towards low ids and is outweighed by one real count.
        self.counts = 1e-3 * (1.0 - np.arange(self.vocab_size, dtype=np.float64) / self.vocab_size)

    def observe(self, tokens: Iterable[int]) -> None:
        ids = np.fromiter((t for t in tokens if 0 <= t < self.vocab_size), dtype=np.int64)
        if ids.size:
            np.add.at(self.counts, ids, 1.0)
            self._pending += int(ids.size)

    def ids(self) -> mx.array:
        """The restricted set, sorted ascending, as an int32 array. The same array object is
        returned until a re-ranking changes the membership."""
        if self._ids is not None and self._pending < self.refresh_every:
            return self._ids
        self._pending = 0
        n = min(self.size, self.vocab_size)
        top = np.argpartition(-self.counts, n - 1)[:n] if n < self.vocab_size else np.arange(n)
        chosen = np.union1d(top, np.array(self.always, dtype=np.int64)).astype(np.int32)
        if self._ids is None or not np.array_equal(np.array(self._ids), chosen):
            self._ids = mx.array(chosen)
        return self._ids

    def head_matrix(self, parts: ModelParts) -> tuple[mx.array, mx.array]:
        """(ids, the draft head's rows for them), shared until the set or the head changes."""
        ids = self.ids()
        layer = parts.head_layer()
        weight = getattr(layer, "weight", None)  # a new head (another draft) means new rows
        if self._head is None or self._head[0] is not ids or self._head[1] is not weight:
            sub = parts.head_rows(ids)
            assert sub is not None
            mx.eval(sub)
            self._head = (ids, weight, sub)
        return ids, self._head[2]

    @property
    def head_bytes(self) -> int:
        """The current head rows' size (Stats reads it from its own thread: one attribute load
        of an evaluated array's metadata)."""
        head = self._head
        return head[2].nbytes if head is not None else 0

    def coverage(self, tokens: Iterable[int]) -> float:
        """Fraction of `tokens` inside the current set (what bounds acceptance)."""
        toks = list(tokens)
        if not toks:
            return 1.0
        inside = set(np.array(self.ids()).tolist())
        return sum(t in inside for t in toks) / len(toks)


class DraftHead:
    """The draft's logits, over the full vocabulary or restricted to a DraftVocab.

    `logits(tokens, cache)` advances the draft cache and returns (ids, logits) where `ids` is
    None for the full vocabulary, else the (N,) token ids the N logits refer to.
    """

    def __init__(
        self, parts: ModelParts, vocab: DraftVocab | None = None, extra: Iterable[int] = ()
    ):
        self.parts = parts
        self.vocab = vocab if parts.splittable else None
        # Tokens of this request's prompt join the set: answers reuse the prompt's words.
        self.extra = tuple(extra)
        if self.vocab is not None and parts.vocab_rows() is None:
            self.vocab = None  # no separable head: score the full vocabulary
        self._sub: tuple[mx.array, mx.array, mx.array | None] | None = None

    def _restricted(self) -> tuple[mx.array, mx.array, mx.array | None]:
        """(ids, shared head rows, rows of this prompt's tokens outside the set or None).

        Snapshot once per generation: the shared matrix stays alive for as long as this
        request holds it, even if a re-ranking replaces it meanwhile."""
        if self._sub is None:
            assert self.vocab is not None
            ids, sub = self.vocab.head_matrix(self.parts)
            extra_rows = None
            if self.extra:
                known = set(np.array(ids).tolist())
                missing = sorted({t for t in self.extra if 0 <= t < self.vocab.vocab_size} - known)
                if missing:
                    extra_ids = mx.array(np.array(missing, np.int32))
                    extra_rows = self.parts.head_rows(extra_ids)
                    ids = mx.concatenate([ids, extra_ids])
                    mx.eval(extra_rows, ids)
            self._sub = (ids, sub, extra_rows)
        return self._sub

    def logits(self, tokens: mx.array, cache: list[Any]) -> tuple[mx.array | None, mx.array]:
        if not self.parts.splittable:
            return None, self.parts.last_logits(tokens, cache)
        ids, project = self.projection()
        return ids, project(self.parts.model.model(tokens[None], cache)[0])

    def projection(self) -> tuple[mx.array | None, Callable[[mx.array], mx.array]]:
        """(ids, project) of a splittable draft: project maps its trunk's (n, D) hidden states
        to the logits after the last one (over `ids`, or the full vocabulary for None)."""
        if self.vocab is None:
            return None, lambda hidden: self.parts.head(hidden[None, -1:])[0, -1]
        ids, sub, extra_rows = self._restricted()

        def project(hidden: mx.array) -> mx.array:
            last = hidden[-1]
            logits = last @ sub.T
            if extra_rows is not None:
                logits = mx.concatenate([logits, last @ extra_rows.T])
            return logits

        return ids, project


@dataclass
class _HeadEvidence:
    """Decayed counts of the draft's tested positions while one head served."""

    tested: float = 0.0
    accepted: float = 0.0
    outside: float = 0.0  # tested positions whose target token is outside the set
    accepted_outside: float = 0.0

    def scale(self, factor: float) -> None:
        self.tested *= factor
        self.accepted *= factor
        self.outside *= factor
        self.accepted_outside *= factor


@dataclass
class HeadChoice:
    """Whether the restricted head pays for this pair, decided by measurement, not a default.

    The restricted head makes a draft pass cheaper (both heads' prices are measured at load)
    but can never propose a token outside the set. Every finished request shows how often that
    cost something: at each position the draft was tested (an accepted proposal, or the
    target's token where a proposal was rejected), is the target's token inside the set? A head
    that has served recently is judged by its own acceptance; the other is estimated from the
    same evidence: the restricted head's acceptance inside the set stands for the full head's
    (optimistic, hence a margin), and the full head's acceptance without its accepted proposals
    outside the set is the restricted head's. The head with more tokens per unit of cost at its
    best K serves. The serving head's evidence decays per request, so the choice follows what
    the daemon is used for; the other head's decays slowly, so after ~50 requests it is
    estimated (and perhaps tried) again.
    """

    restricted_prices: Any  # costs.StepPrices with the restricted head's draft pass
    full_prices: Any  # ... with the full head's
    max_k: int = 8
    decay: float = 0.9  # per request, for the head that served it
    idle_decay: float = 0.995  # per request, for the other head
    margin: float = 1.03  # the full head must win by this factor on an estimate
    min_tested: float = 32.0  # tested positions before a head's own figure counts
    use_restricted: bool = True
    _evidence: dict[bool, _HeadEvidence] = field(
        default_factory=lambda: {True: _HeadEvidence(), False: _HeadEvidence()}
    )

    def observe(
        self,
        vocab: DraftVocab,
        restricted: bool,
        completion: Sequence[int],
        from_draft: Sequence[bool],
        rejection_positions: Sequence[int],
    ) -> None:
        """One finished request served with the `restricted` head (or the full one)."""
        tested = [i for i, d in enumerate(from_draft) if d]
        tested += [i for i in rejection_positions if i < len(completion)]
        if not tested:
            return
        inside = set(np.array(vocab.ids()).tolist())
        outside = [i for i in tested if completion[i] not in inside]
        self._evidence[restricted].scale(self.decay)
        self._evidence[not restricted].scale(self.idle_decay)
        e = self._evidence[restricted]
        e.tested += len(tested)
        e.accepted += sum(from_draft)
        e.outside += len(outside)
        e.accepted_outside += sum(1 for i in outside if from_draft[i])
        self._decide()

    def acceptance(self, restricted: bool) -> float | None:
        """The head's acceptance: measured when it served enough, else estimated from the
        other head's evidence; None with too little of either."""
        own = self._evidence[restricted]
        if own.tested >= self.min_tested:
            return own.accepted / own.tested
        other = self._evidence[not restricted]
        if other.tested < self.min_tested:
            return None
        if restricted:  # what the full head accepted, less what lay outside the set
            return (other.accepted - other.accepted_outside) / other.tested
        inside = max(other.tested - other.outside, 1e-9)
        return min(other.accepted / inside, 0.99)

    def _decide(self) -> None:
        from speclora.daemon.engine.adaptive import expected_tokens

        a_r, a_f = self.acceptance(True), self.acceptance(False)
        if a_r is None or a_f is None:
            return

        def best(alpha: float, prices: Any) -> float:
            gains = [
                expected_tokens(alpha, k) / prices.draft_step(k) for k in range(1, self.max_k + 1)
            ]
            return max([1.0, *gains])

        g_r, g_f = best(a_r, self.restricted_prices), best(a_f, self.full_prices)
        measured_full = self._evidence[False].tested >= self.min_tested
        self.use_restricted = not (g_f > g_r * (1.0 if measured_full else self.margin))
