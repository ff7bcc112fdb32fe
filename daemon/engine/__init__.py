"""Speculative decoding engine: plain generators over mlx-lm models, no gRPC.

`generate()` is the whole API the worker needs: it returns an iterator of EngineEvents in
which each `next()` does one bounded unit of work (one prefill chunk or one target pass), so
the worker interleaves requests by advancing each in turn. Caches are per generation.
"""

from __future__ import annotations

from typing import Any

from speclora.daemon.engine.adaptive import (
    AcceptanceMemory,
    AdaptiveK,
    FixedK,
    measure_step_costs,
    speedup_bound,
)
from speclora.daemon.engine.controller import HistoryMemory, ProposalSource
from speclora.daemon.engine.costs import StepPrices, default_prices, measure_prices
from speclora.daemon.engine.draft_vocab import DraftVocab
from speclora.daemon.engine.events import (
    ChatTurn,
    Constraint,
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
    "Constraint",
    "DraftVocab",
    "EngineEvent",
    "FixedK",
    "Generation",
    "GenerationRequest",
    "GenerationSummary",
    "HistoryMemory",
    "PrefillProgress",
    "PromptCache",
    "SamplingParams",
    "StepEvent",
    "StepPrices",
    "StepTrace",
    "TextChunk",
    "build_prompt_tokens",
    "default_prices",
    "generate",
    "measure_prices",
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
    prices: StepPrices | None = None,
    acceptance_memory: AcceptanceMemory | None = None,
    history: ProposalSource | None = None,
    history_memory: HistoryMemory | None = None,
    history_config: Any | None = None,
    prompt_cache: PromptCache | None = None,
    draft_tag: str = "",
    batch_width: Any | None = None,
) -> Generation:
    """Start a generation; iterate the result for events, the last being the summary.

    target/draft: mlx-lm models (draft None, or request.draft_tokens == 0: plain decoding).
    spec: the `speculation` config section (SpeculationConfig).
    draft_vocab: restrict the draft's head to a frequency-ranked vocabulary (detailed mode).
    prompt_tokens: already built with build_prompt_tokens (saves tokenizing twice).
    prices: what a step costs on this machine in target passes (measure_prices at load), for
        the controller; None = Leviathan's model with a small verify slope.
    acceptance_memory: acceptance seen by earlier requests (one per draft, kept by the worker):
        adaptive K starts from it instead of `adaptive_start`, and this request adds to it.
    history: the request's history drafter (engine.history.RequestHistory, built from the
        prompt): suffix matches over its own tokens and past outputs (detailed mode, adaptive K).
    history_memory: history's calibration seen by earlier requests (one per target).
    history_config: the `history` config section (proposal length, thresholds).
    prompt_cache: finished requests' target caches (one per target, kept by the worker): the
        longest stored prefix of the prompt is not prefilled again (detailed mode).
    draft_tag: names the draft's current weights (the adapter version), so a draft cache
        stored under other weights is not reused.
    batch_width: the worker's engine.batch.BatchWidth: how wide its shared target forwards
        are, so the controller prices steps by what they add to them.
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
            prices=prices,
            memory=acceptance_memory,
            history=history,
            history_memory=history_memory,
            history_config=history_config,
            prompt_cache=prompt_cache,
            draft_tag=draft_tag,
            tokenizer=tokenizer,
            batch_width=batch_width,
        )
    return Generation(steps, tracker)
