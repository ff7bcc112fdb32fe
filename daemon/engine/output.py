"""Completion bookkeeping shared by both modes: stop conditions, safe text, the summary.

Tokens go in as the engine emits them; text chunks come out that never split a UTF-8
character (the streaming detokenizer holds incomplete bytes back) and never contain any
part of a stop string (a tail that could still grow into one is held back until it cannot).
The text is the tokenizer's decode of the ids, with either kind of tokenizer (the snapshot's or
mlx-lm's wrapper), so a completion's leading space is kept the same way on both.
Concatenating every chunk's text and token ids gives exactly the completion text and ids.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from speclora.daemon.engine.events import (
    EngineEvent,
    FinishReason,
    ForwardPass,
    GenerationRequest,
    GenerationSummary,
    Source,
    TextChunk,
)
from speclora.daemon.tokenizer import StreamingDetokenizer

if TYPE_CHECKING:
    import mlx.core as mx


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class CompletionTracker:
    """Accumulates one completion; decides when it is finished and why.

    The EOS token that ends a completion is kept in the token ids (the draft is trained to
    predict it too) but contributes no text. After a stop string, the ids end at the token
    that completed it and the text ends just before it.
    """

    def __init__(self, tokenizer: Any, request: GenerationRequest, prompt_ids: Sequence[int]):
        self.request = request
        self.prompt_ids = tuple(prompt_ids)
        self.eos_ids = frozenset(int(t) for t in tokenizer.eos_token_ids)
        self.stops = tuple(s for s in request.stop if s)
        self._max_stop = max((len(s) for s in self.stops), default=0)
        self._detok = StreamingDetokenizer(tokenizer)
        self.ids: list[int] = []
        self.from_draft: list[bool] = []
        self.from_history: list[bool] = []
        self.from_grammar: list[bool] = []
        self.rejection_positions: list[int] = []
        self.finish_reason: FinishReason | None = None
        self._text_sent = ""  # only its last _max_stop chars matter, for stop matching
        self._pending_text = ""
        self._pending_from = 0  # index into ids of the first token not yet in a chunk
        # Counters and clocks.
        self.proposed = {"draft": 0, "history": 0, "grammar": 0}  # by source
        self.accepted = {"draft": 0, "history": 0, "grammar": 0}
        self.target_passes = 0
        # From the request's arrival when the caller knows it, so queueing counts in TTFT.
        self.start = request.received_at if request.received_at is not None else time.perf_counter()
        self.prefill_done: float | None = None
        self.cached_prompt_tokens = 0  # prompt tokens a prompt cache spared from prefill
        self.first_token: float | None = None
        self.end: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining(self) -> int:
        return self.request.max_tokens - len(self.ids)

    def _check_stop(self) -> bool:
        if not self.stops:
            return False
        window = self._text_sent[-self._max_stop :] + self._pending_text
        offset = len(window) - len(self._pending_text)
        cut = min((i for s in self.stops if (i := window.find(s)) >= 0), default=-1)
        if cut < 0:
            return False
        # A stop string can begin in text already sent only if that text ended with a prefix
        # of it, which _held_back never lets out; so cut >= offset here.
        self._pending_text = self._pending_text[: max(cut - offset, 0)]
        self.finish_reason = "stop_string"
        return True

    def count_step(self, source: Source, proposed: int, accepted: int) -> None:
        """Account one speculative step's proposals (a plain step proposes nothing)."""
        if source != "target":
            self.proposed[source] += proposed
            self.accepted[source] += accepted

    def add(
        self, tokens: Sequence[int], accepted: int = 0, source: Source = "target"
    ) -> TextChunk | None:
        """Append a step's tokens in order (the first `accepted` were proposed by `source`),
        stopping at the first stop condition; the safe new text."""
        for i, token in enumerate(tokens):
            if self.finished:
                break
            if self.first_token is None:
                self.first_token = time.perf_counter()
            proposed = i < accepted
            self.ids.append(int(token))
            self.from_draft.append(proposed and source == "draft")
            self.from_history.append(proposed and source == "history")
            self.from_grammar.append(proposed and source == "grammar")
            if token in self.eos_ids:
                self.finish_reason = "eos"
                break
            self._detok.add_token(int(token))
            self._pending_text += self._detok.last_segment
            if self._check_stop():
                break
            if self.remaining <= 0:
                self.finish_reason = "length"
        if self.finished:
            return self._flush()
        return self._emit(len(self._pending_text) - _held_back(self._pending_text, self.stops))

    def finish(self, reason: FinishReason) -> TextChunk | None:
        """End the completion now (e.g. cancelled); flush what may be shown."""
        if not self.finished:
            self.finish_reason = reason
        return self._flush()

    def _flush(self) -> TextChunk | None:
        if self.finish_reason != "stop_string":
            self._detok.finalize()
            self._pending_text += self._detok.last_segment
            # A stop string ending in a held-back space only completes on finalize.
            self._check_stop()
        return self._emit(len(self._pending_text), final=True)

    def _emit(self, upto: int, final: bool = False) -> TextChunk | None:
        text = self._pending_text[:upto]
        if not text and not (final and self._pending_from < len(self.ids)):
            return None
        start, self._pending_from = self._pending_from, len(self.ids)
        self._pending_text = self._pending_text[upto:]
        if self.stops:
            self._text_sent = (self._text_sent + text)[-self._max_stop :]
        return TextChunk(
            text=text,
            token_ids=tuple(self.ids[start:]),
            from_draft=tuple(self.from_draft[start:]),
            from_history=tuple(self.from_history[start:]),
            from_grammar=tuple(self.from_grammar[start:]),
        )

    def summary(self) -> GenerationSummary:
        end = self.end if self.end is not None else time.perf_counter()
        total = end - self.start
        ttft = (self.first_token - self.start) if self.first_token is not None else total
        decode_start = self.prefill_done if self.prefill_done is not None else self.start
        decode_time = end - decode_start
        n = len(self.ids)
        return GenerationSummary(
            prompt_tokens=len(self.prompt_ids),
            cached_prompt_tokens=self.cached_prompt_tokens,
            completion_tokens=n,
            proposed=sum(self.proposed.values()),
            accepted=sum(self.accepted.values()),
            draft_proposed=self.proposed["draft"],
            draft_accepted=self.accepted["draft"],
            history_proposed=self.proposed["history"],
            history_accepted=self.accepted["history"],
            grammar_proposed=self.proposed["grammar"],
            grammar_accepted=self.accepted["grammar"],
            from_grammar=tuple(self.from_grammar),
            target_passes=self.target_passes,
            time_to_first_token_s=ttft,
            tokens_per_second=n / decode_time if decode_time > 0 and n else 0.0,
            total_time_s=total,
            finish_reason=self.finish_reason or "cancelled",
            mode=self.request.mode,
            prompt_token_ids=self.prompt_ids,
            completion_token_ids=tuple(self.ids),
            from_draft=tuple(self.from_draft),
            from_history=tuple(self.from_history),
            rejection_positions=tuple(self.rejection_positions),
            sampling=self.request.sampling,
        )


class Generation(Iterator[EngineEvent]):
    """A running generation: an iterator of events with a way to stop it and still account.

    `next()` advances one bounded unit of work. `close()` stops it and releases its caches
    (the engine's `finally`); `cancel()` does the same and returns a summary of what was
    generated so far, with finish_reason "cancelled". Text still held back at that moment
    (a partial character, a tail that could grow into a stop string) is flushed into
    `final_chunk`: send it before the summary so the chunks add up to the summary's tokens.

    Iterating runs each of the engine's target passes alone. A driver that batches passes
    across generations (the worker) calls `advance` instead: it hands out the `ForwardPass`es
    and takes their logits back.
    """

    def __init__(
        self,
        steps: Generator[EngineEvent | ForwardPass, mx.array | None, None],
        tracker: CompletionTracker,
    ):
        self._steps = steps
        self.tracker = tracker
        self.final_chunk: TextChunk | None = None

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> EngineEvent:
        item = next(self._steps)
        while isinstance(item, ForwardPass):
            item = self._steps.send(item.run())
        return item

    def advance(self, logits: mx.array | None = None) -> EngineEvent | ForwardPass:
        """The next event, or the next target pass the engine needs. After a `ForwardPass`,
        pass its logits (`run_passes`) to the next call."""
        return next(self._steps) if logits is None else self._steps.send(logits)

    def fail_pass(self, error: BaseException) -> EngineEvent | ForwardPass:
        """The pass the engine asked for failed: raise `error` inside it (its caches are then
        not kept) and return what it does next (normally it re-raises)."""
        return self._steps.throw(error)

    def close(self) -> None:
        self._steps.close()

    def cancel(self) -> GenerationSummary:
        self._steps.close()
        if not self.tracker.finished:
            self.final_chunk = self.tracker.finish("cancelled")
        if self.tracker.end is None:
            self.tracker.end = time.perf_counter()
        return self.tracker.summary()
