"""Fast mode: mlx-lm's own speculative decoding, wrapped in our event types.

`mlx_lm.stream_generate(..., draft_model=...)` does the work; we only add the bookkeeping
both modes share (stop strings, UTF-8-safe chunks, the summary) and a seeded sampler with its
own PRNG key so interleaved requests do not disturb each other. It reports per token whether
the draft proposed it, nothing finer, and has no adaptive K (an unset K uses the configured
`draft_tokens`, else `adaptive_start`). mlx-lm's acceptance rule at T > 0 is "the draft's
sample equals the target's sample", which is lossless but accepts less than ours. It has no
history drafter either: proposals from past requests are detailed mode's (the default).

The prompt is prefilled here, `speculation.prefill_chunk` tokens per event, into caches that
are then handed to mlx-lm with only the prompt's last token: mlx-lm would prefill the whole
prompt inside its first step, and the worker, which interleaves requests one event at a time,
would stall every other stream for that long.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Generator
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from speclora.daemon.engine.draft_vocab import model_parts
from speclora.daemon.engine.events import (
    EngineEvent,
    GenerationRequest,
    PrefillProgress,
    SamplingParams,
    StepEvent,
)
from speclora.daemon.engine.output import CompletionTracker
from speclora.daemon.engine.sampling import make_key, sample, split_key


def seeded_sampler(params: SamplingParams) -> Any:
    """An mlx-lm sampler (logprobs -> tokens) drawing from our filtered distribution with a
    private key, so a seeded fast-mode request is reproducible."""
    key = make_key(params.seed)

    def sampler(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, sub = split_key(key)
        return sample(logprobs, params, sub)

    return sampler


_wrapped: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def mlx_tokenizer(tokenizer: Any) -> Any:
    """mlx-lm's TokenizerWrapper over `tokenizer`, built once per tokenizer (~50 ms):
    stream_generate detokenizes and watches for EOS with it."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    if isinstance(tokenizer, TokenizerWrapper):
        return tokenizer
    wrapped = _wrapped.get(tokenizer)
    if wrapped is None:
        wrapped = TokenizerWrapper(tokenizer, eos_token_ids=tokenizer.eos_token_ids)
        _wrapped[tokenizer] = wrapped
    return wrapped


def fast_draft_tokens(request: GenerationRequest, spec: Any) -> int:
    if request.draft_tokens is not None:
        return request.draft_tokens
    return spec.draft_tokens if spec.draft_tokens is not None else spec.adaptive_start


def fast_steps(
    target: Any,
    draft: Any | None,
    tokenizer: Any,
    request: GenerationRequest,
    spec: Any,
    tracker: CompletionTracker,
) -> Generator[EngineEvent, None, None]:
    """One event per prefill chunk, then one per token mlx-lm yields; the last is the summary."""
    k = fast_draft_tokens(request, spec)
    speculate = draft is not None and k > 0
    if tracker.remaining <= 0:
        tracker.finish("length")
        tracker.end = time.perf_counter()
        yield tracker.summary()
        return
    prompt = list(tracker.prompt_ids)
    models = [target, draft] if speculate else [target]
    caches = [make_prompt_cache(m) for m in models]
    body = len(prompt) - 1  # the last prompt token goes to mlx-lm, which needs one to start
    done = 0
    while done < body:
        stop = min(body, done + spec.prefill_chunk)
        tokens = mx.array(prompt[done:stop], mx.uint32)
        for m, cache in zip(models, caches, strict=True):
            model_parts(m).trunk(tokens, cache)
        mx.eval([c.state for cache in caches for c in cache])
        done = stop
        yield PrefillProgress(done=done, total=len(prompt))
    kwargs: dict[str, Any] = {
        "max_tokens": request.max_tokens,
        "sampler": seeded_sampler(request.sampling),
        "prefill_step_size": spec.prefill_chunk,
        # mlx-lm splits a speculative cache list into the target's layers, then the draft's.
        "prompt_cache": [c for cache in caches for c in cache],
    }
    if speculate:
        kwargs["num_draft_tokens"] = k
    # mlx-lm's generate module imports transformers: fast mode pays that, detailed mode not.
    from mlx_lm import stream_generate

    responses = stream_generate(
        target,
        mlx_tokenizer(tokenizer),
        mx.array(prompt[body:], mx.uint32),
        draft_model=draft if speculate else None,
        **kwargs,
    )
    step_open = False  # inside a speculative step (after its first token, before its last)
    step_k = step_accepted = 0
    try:
        for response in responses:
            if tracker.prefill_done is None:
                tracker.prefill_done = time.perf_counter()
            if not step_open:
                # mlx-lm drafts min(K, tokens left) at each step's start; one target pass each.
                tracker.target_passes += 1
                step_k = min(k, request.max_tokens - len(tracker.ids)) if speculate else 0
                step_accepted = 0
                tracker.count_step("draft", step_k, 0)
            drafted = bool(response.from_draft)
            step_open = drafted
            if drafted:
                step_accepted += 1
                tracker.count_step("draft", 0, 1)
            elif step_accepted < step_k:
                tracker.rejection_positions.append(len(tracker.ids))
            text = tracker.add([int(response.token)], int(drafted), "draft")
            yield StepEvent(chunk=text)
            if tracker.finished:
                break
        if not tracker.finished:  # mlx-lm stopped first: what the tracker held back goes out too
            final = tracker.finish("length")
            if final is not None:
                yield StepEvent(chunk=final)
        tracker.end = time.perf_counter()
        yield tracker.summary()
    finally:
        responses.close()
