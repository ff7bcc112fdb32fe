"""Structured output: a grammar's token masks and forced tokens, via llguidance.

A request may carry a `Constraint` (events.py): a JSON schema, "any JSON object", a regular
expression or a Lark grammar. `compile_constraint` turns it into llguidance's grammar and
validates it without a tokenizer (requests.py calls it before any work is queued); the engine
then starts a `GrammarState` per generation: an `LLMatcher` over the target's tokenizer that has
consumed exactly the completion so far.

Why llguidance: it computes a mask over a 49k vocabulary in tens of microseconds on the CPU,
returns it as a plain bitmask (numpy, no torch), can roll back any number of tokens (what
speculation needs after a rejection), and reports the tokens the grammar forces
(`compute_ff_tokens`), which the controller proposes with no draft pass.

Lossless under speculation (speculative.py): every row of the target's logits that decides a
token is masked with the matcher's state at that position, before temperature, top-k and top-p,
exactly as a constrained target-only loop would; the draft's logits are masked the same way so
its proposals are legal; the matcher runs ahead over the proposals to get each row's mask, then
rolls back and consumes what was accepted.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from speclora.daemon.engine.events import Constraint

# JSON is written compactly but with Python's separators (what models see most): no free
# whitespace, so a small model cannot wander into a run of spaces or newlines, and every
# separator is a forced run the controller proposes for free. A schema's own "x-guidance"
# options override these.
JSON_DEFAULTS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
ANY_OBJECT_SCHEMA = '{"type": "object"}'
MAX_SOURCE_CHARS = 100_000  # a schema, regex or grammar longer than this is refused
KINDS = ("json_schema", "json_object", "regex", "lark")


def compile_constraint(kind: str, source: str) -> Constraint:
    """The validated constraint; ValueError with llguidance's message when it is not one.
    No tokenizer is needed, so a transport can call it before queueing any work."""
    import llguidance

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    if len(source) > MAX_SOURCE_CHARS:
        raise ValueError(f"{len(source)} characters; at most {MAX_SOURCE_CHARS}")
    matcher = llguidance.LLMatcher
    if kind in ("json_schema", "json_object"):
        text = ANY_OBJECT_SCHEMA if kind == "json_object" else source
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"is not valid JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError("must be a JSON object (a JSON schema)")
        grammar = matcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_DEFAULTS)
    elif kind == "regex":
        if not source:
            raise ValueError("is empty")
        grammar = matcher.grammar_from_regex(source)
    else:
        if not source.strip():
            raise ValueError("is empty")
        grammar = matcher.grammar_from_lark(source)
    is_error, messages = matcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(_short(messages[0] if messages else "is not a valid grammar"))
    return Constraint(kind=kind, source=source, grammar=grammar)  # type: ignore[arg-type]


def _short(message: str, limit: int = 300) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 3] + "..."


_lock = threading.Lock()
_tokenizers: dict[tuple[int, int], tuple[Any, Any]] = {}


def ll_tokenizer(tokenizer: Any, vocab: int) -> Any:
    """llguidance's tokenizer for a tokenizer (ours, or mlx-lm's over transformers) and a
    logits width, built once (~0.7 s for a 49k vocabulary). The grammar's only end token is
    the tokenizer's `eos_token_id`."""
    import llguidance

    key = (id(tokenizer), vocab)
    with _lock:
        hit = _tokenizers.get(key)
        if hit is not None and hit[0] is tokenizer:
            return hit[1]
    if hasattr(tokenizer, "to_json"):  # speclora.daemon.tokenizer.Tokenizer
        built = llguidance.LLTokenizer(
            tokenizer.to_json(), n_vocab=vocab, eos_token=eos_token(tokenizer)
        )
    else:
        import llguidance.hf  # imports transformers, which such a tokenizer has loaded already

        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        built = llguidance.hf.from_tokenizer(hf, n_vocab=vocab, eos_token=eos_token(tokenizer))
    with _lock:
        if len(_tokenizers) >= 8:
            _tokenizers.clear()
        _tokenizers[key] = (tokenizer, built)
    return built


def eos_token(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = min(tokenizer.eos_token_ids)
    return int(eos)


class GrammarError(RuntimeError):
    """The matcher could not start or went into its error state (a bug or a resource limit)."""


class GrammarState:
    """One generation's matcher. Invariant: it has consumed exactly the completion's tokens.

    `allowed()` is the mask of the next position (cached until the state changes);
    `masks(tokens)` runs ahead over proposals, giving the mask before each of them and after the
    last, and comes back; `advance(tokens)` consumes what was emitted."""

    def __init__(self, constraint: Constraint, tokenizer: Any, vocab: int) -> None:
        import llguidance

        self.vocab = vocab
        self.eos = eos_token(tokenizer)
        self._tokenizer = ll_tokenizer(tokenizer, vocab)
        self.matcher = llguidance.LLMatcher(self._tokenizer, constraint.grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())
        self._allowed: np.ndarray | None = None
        self._pushed: list[bool] = []  # per push: whether the matcher recorded it

    def allowed(self) -> np.ndarray:
        """(vocab,) bool: the tokens the grammar allows next."""
        if self._allowed is None:
            bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
            mask = np.unpackbits(bits, bitorder="little")[: self.vocab].astype(bool)
            if mask.shape[0] < self.vocab:
                mask = np.concatenate([mask, np.zeros(self.vocab - mask.shape[0], bool)])
            self._allowed = mask
        return self._allowed

    def only(self) -> int | None:
        """The one token the grammar allows next, if exactly one."""
        ids = np.flatnonzero(self.allowed())
        return int(ids[0]) if ids.shape[0] == 1 else None

    def dead(self) -> bool:
        """No token can continue (an error state, or a grammar with no way on)."""
        return self.matcher.is_error() or not self.allowed().any()

    def accepting(self) -> bool:
        return self.matcher.is_accepting()

    def legal_prefix(self, tokens: Sequence[int]) -> int:
        """How many leading tokens the grammar allows, through the first end token."""
        n = self.matcher.validate_tokens(list(tokens)) if tokens else 0
        for i, token in enumerate(tokens[:n]):
            if token == self.eos:
                return i + 1
        return n

    def free_end(self, tokens: Sequence[int]) -> bool:
        """Whether legal `tokens` end with an end token the grammar forces there (complete,
        nothing else allowed): the engine emits that one without a pass, so a proposal need
        not carry it."""
        if not tokens or tokens[-1] != self.eos:
            return False
        head = list(tokens[:-1])
        for token in head:
            self.push(token)
        try:
            return self.only() == self.eos
        finally:
            self.pop(len(head))

    def forced(self, limit: int) -> tuple[int, ...]:
        """The tokens the grammar forces from here (its fixed run), at most `limit`."""
        if limit <= 0 or self.matcher.is_stopped():
            return ()
        return tuple(self.matcher.compute_ff_tokens()[:limit])

    def likely(self, forced: Sequence[int], limit: int) -> tuple[int, ...]:
        """Tokens for the rest of the grammar's fixed bytes after `forced` (what `forced`
        returned), at most `limit`: the bytes are certain but not how the target splits them,
        so these are a guess (the canonical tokenization of those bytes alone; the target may
        merge the last with the free text after it). Only a legal run is returned."""
        if limit <= 0 or self.matcher.is_stopped():
            return ()
        fixed = bytes(self.matcher.compute_ff_bytes())
        done = bytes(self._tokenizer.decode_bytes(list(forced))) if forced else b""
        if len(fixed) <= len(done) or not fixed.startswith(done):
            return ()
        guess = list(self._tokenizer.tokenize_bytes(fixed[len(done) :]))[:limit]
        if not guess:
            return ()
        legal = self.matcher.validate_tokens([*forced, *guess]) - len(forced)
        return tuple(guess[: max(legal, 0)])

    def push(self, token: int) -> None:
        """Consume one (legal) proposal while running ahead; `pop` undoes."""
        # An end token after a complete grammar is not recorded by the matcher (so not rolled
        # back either): the stack says which pushes it counted.
        recorded = not (int(token) == self.eos and self.matcher.is_stopped())
        if recorded and not self.matcher.consume_token(int(token)):
            raise GrammarError(self.matcher.get_error() or f"token {token} is not allowed")
        self._pushed.append(recorded)
        self._allowed = None

    def pop(self, n: int) -> None:
        """Undo the last n pushes."""
        if n <= 0:
            return
        undo = sum(self._pushed[-n:])
        del self._pushed[-n:]
        if undo and not self.matcher.rollback(undo):
            raise GrammarError(self.matcher.get_error() or "rollback failed")
        self._allowed = None

    def masks(self, tokens: Sequence[int]) -> np.ndarray:
        """(len(tokens) + 1, vocab) bool: the mask before each token and after the last. The
        tokens must be legal (legal_prefix); the state is unchanged afterwards."""
        rows = [self.allowed()]
        for token in tokens:
            self.push(token)
            rows.append(self.allowed())
        self.pop(len(tokens))
        self._allowed = rows[0]
        return np.stack(rows)

    def advance(self, tokens: Sequence[int]) -> None:
        """Consume emitted tokens for good (never popped)."""
        for token in tokens:
            self.push(token)
        del self._pushed[: max(len(self._pushed) - 64, 0)]  # pops only reach one step back
