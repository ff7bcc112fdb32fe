"""Speculative decoding engine: plain generators over mlx-lm models, no gRPC.

`generate()` is the whole API the worker needs: it returns an iterator of EngineEvents in
which each `next()` does one bounded unit of work (one prefill chunk or one target pass), so
the worker interleaves requests by advancing each in turn. Caches are per generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from speclora.daemon.engine.adaptive import (
    AcceptanceMemory,
    AdaptiveK,
    FixedK,
    measure_step_costs,
    speedup_bound,
)
from speclora.daemon.engine.draft_vocab import DraftVocab
from speclora.daemon.engine.events import (
    ChatTurn,
    EngineEvent,
    GenerationRequest,
    GenerationSummary,
    PrefillProgress,
    SamplingParams,
    StepEvent,
    StepTrace,
    TextChunk,
)
from speclora.daemon.engine.output import CompletionTracker, Generation
from speclora.daemon.engine.prompt import build_prompt_tokens
from speclora.daemon.engine.prompt_cache import PromptCache

__all__ = [
    "AcceptanceMemory",
    "AdaptiveK",
    "ChatTurn",
    "DraftVocab",
    "EngineEvent",
    "FixedK",
    "Generation",
    "GenerationRequest",
    "GenerationSummary",
    "PrefillProgress",
    "PromptCache",
    "SamplingParams",
    "StepEvent",
    "StepTrace",
    "TextChunk",
    "build_prompt_tokens",
    "generate",
    "measure_step_costs",
    "speedup_bound",
]


def generate(
    target: Any,
    draft: Any | None,
    tokenizer: Any,
    request: GenerationRequest,
    spec: Any,
    *,
    draft_vocab: DraftVocab | None = None,
    prompt_tokens: list[int] | None = None,
    step_costs: Sequence[float] | None = None,
    acceptance_memory: AcceptanceMemory | None = None,
    prompt_cache: PromptCache | None = None,
    draft_tag: str = "",
) -> Generation:
    """Start a generation; iterate the result for events, the last being the summary.

    target/draft: mlx-lm models (draft None, or request.draft_tokens == 0: plain decoding).
    spec: the `speculation` config section (SpeculationConfig).
    draft_vocab: restrict the draft's head to a frequency-ranked vocabulary (detailed mode).
    prompt_tokens: already built with build_prompt_tokens (saves tokenizing twice).
    step_costs: [k] = a step with k proposals in target passes, for adaptive K (measure_step_costs).
    acceptance_memory: acceptance seen by earlier requests (one per draft, kept by the worker):
        adaptive K starts from it instead of `adaptive_start`, and this request adds to it.
    prompt_cache: finished requests' target caches (one per target, kept by the worker): the
        longest stored prefix of the prompt is not prefilled again (detailed mode).
    draft_tag: names the draft's current weights (the adapter version), so a draft cache
        stored under other weights is not reused.
    Raises InvalidRequestError (from the prompt) before any work is done.
    """
    ids = prompt_tokens if prompt_tokens is not None else build_prompt_tokens(tokenizer, request)
    tracker = CompletionTracker(tokenizer, request, ids)
    if request.mode == "fast":
        from speclora.daemon.engine.fast import fast_steps

        steps = fast_steps(target, draft, tokenizer, request, spec, tracker)
    else:
        from speclora.daemon.engine.speculative import detailed_steps

        steps = detailed_steps(
            target,
            draft,
            request,
            spec,
            tracker,
            draft_vocab=draft_vocab,
            step_costs=step_costs,
            memory=acceptance_memory,
            prompt_cache=prompt_cache,
            draft_tag=draft_tag,
        )
    return Generation(steps, tracker)
