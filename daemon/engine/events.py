"""Plain dataclasses the engine takes and yields. No gRPC, no MLX.

The servicer converts protobuf <-> these at the edge; the worker, engine, stats and learning
loop speak only these.

An engine generation is a generator of `EngineEvent`s. Each `next()` does a bounded amount of
work (one prefill chunk or one speculative step: one target pass), so the worker can interleave
many requests by calling `next()` on each in turn. The last event is always a
`GenerationSummary`. Closing the generator early (cancellation) rewinds/releases its caches in
the engine's `finally`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["detailed", "fast"]
# grammar_incomplete: max_tokens ran out (or no token could continue) before the output
# completed the request's grammar, so the text does not match it.
FinishReason = Literal["eos", "length", "stop_string", "cancelled", "grammar_incomplete"]
# Who proposed the tokens of a step: the model draft, the history drafter (suffix matches over
# the request's own tokens and past requests' outputs), the request's grammar (the tokens it
# forces), or nobody (a plain target pass).
Source = Literal["draft", "history", "grammar", "target"]
ConstraintKind = Literal["json_schema", "json_object", "regex", "lark"]


@dataclass(frozen=True)
class ChatTurn:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None = fresh randomness

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Constraint:
    """Structured output: what the completion must match (engine/grammar.py compiles it)."""

    kind: ConstraintKind
    source: str  # the schema's JSON text, the regex or the Lark grammar ("" for json_object)
    grammar: str  # llguidance's grammar, compiled from source and validated


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request. Either `prompt` or `messages` is set (checked by the servicer)."""

    prompt: str = ""
    messages: tuple[ChatTurn, ...] = ()
    raw: bool = False  # send `prompt` as-is, no chat template
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    draft_tokens: int | None = None  # None = adaptive K, 0 = no speculation
    mode: Mode = "detailed"
    record: bool = True
    use_history: bool = True  # let the history drafter propose (adaptive K only)
    request_id: str = ""
    constraint: Constraint | None = None  # structured output (detailed mode)
    # time.perf_counter() when the request arrived (the RPC's start): time to first token and
    # total time count from here, so waiting in the queue shows. None = when the engine starts.
    received_at: float | None = None


@dataclass(frozen=True)
class TextChunk:
    """Text made safe to show: whole UTF-8 characters, never part of a stop string."""

    text: str
    token_ids: tuple[int, ...]
    from_draft: tuple[bool, ...]  # per token: a model-draft proposal the target accepted
    from_history: tuple[bool, ...] = ()  # per token: a history proposal the target accepted
    from_grammar: tuple[bool, ...] = ()  # per token: a grammar-forced proposal the target took


@dataclass(frozen=True)
class StepTrace:
    """What one speculative step did (detailed mode). Failure cases and stats come from these."""

    k: int  # tokens proposed this step (0 = plain target step)
    proposed: tuple[int, ...]  # the proposals
    draft_probs: tuple[float, ...]  # q(x) of each proposal (history: its empirical confidence)
    target_probs: tuple[float, ...]  # p(x) of each proposal under the target
    accepted: int  # how many proposals were accepted (prefix length)
    emitted: tuple[int, ...]  # tokens this step added: accepted proposals + one target token
    first_rejection: int | None  # index in `proposed` of the first rejected proposal
    source: Source = "draft"  # who proposed (k = 0: "target")


@dataclass(frozen=True)
class PrefillProgress:
    done: int
    total: int


@dataclass(frozen=True)
class StepEvent:
    """One target pass. `chunk` is None when the step's text is held back (stop-string
    prefix, partial UTF-8) or when it emitted nothing."""

    chunk: TextChunk | None
    trace: StepTrace | None = None


@dataclass(frozen=True)
class GenerationSummary:
    prompt_tokens: int
    completion_tokens: int
    proposed: int
    accepted: int
    target_passes: int
    time_to_first_token_s: float
    tokens_per_second: float
    total_time_s: float
    finish_reason: FinishReason
    mode: Mode
    prompt_token_ids: tuple[int, ...] = ()
    completion_token_ids: tuple[int, ...] = ()
    from_draft: tuple[bool, ...] = ()  # per completion token: an accepted model-draft proposal
    from_history: tuple[bool, ...] = ()  # per completion token: an accepted history proposal
    rejection_positions: tuple[int, ...] = ()  # completion indices where a proposal was rejected
    sampling: SamplingParams = field(default_factory=SamplingParams)
    cached_prompt_tokens: int = 0  # of prompt_tokens, taken from the prompt cache
    # proposed/accepted split by source (they add up to proposed/accepted).
    draft_proposed: int = 0
    draft_accepted: int = 0
    history_proposed: int = 0
    history_accepted: int = 0
    grammar_proposed: int = 0  # the tokens a request's grammar forced, proposed with no draft
    grammar_accepted: int = 0
    from_grammar: tuple[bool, ...] = ()  # per completion token: an accepted grammar proposal

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def draft_acceptance_rate(self) -> float:
        """The model draft's own acceptance: what the failure-case rule and LoRA judge."""
        return self.draft_accepted / self.draft_proposed if self.draft_proposed else 0.0

    @property
    def history_acceptance_rate(self) -> float:
        return self.history_accepted / self.history_proposed if self.history_proposed else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.completion_tokens / self.target_passes if self.target_passes else 0.0


EngineEvent = PrefillProgress | StepEvent | GenerationSummary


@dataclass
class ForwardPass:
    """Not an event for clients: a detailed generation's request for one forward of `model`
    (the target, or the draft) over `tokens` (a 1-D mx.array) on its KV `cache`. Its driver
    answers with the (len(tokens), V) logits, or with `head(hidden)` when a head is given (the
    draft's: its restricted vocabulary at the last position), where hidden is the trunk's
    (len(tokens), D) output. Alone: `run`; batched with other generations' passes on the same
    model: engine/batch.py."""

    model: Any
    tokens: Any
    cache: list[Any]
    head: Any = None  # Callable[[hidden], logits] | None = the model's own logits

    @property
    def width(self) -> int:
        return int(self.tokens.shape[0])

    def run(self) -> Any:
        """The pass alone: the model's own call (its trunk's, then `head`)."""
        if self.head is None:
            return self.model(self.tokens[None], cache=self.cache)[0]
        return self.head(self.model.model(self.tokens[None], self.cache)[0])
