"""The one validation of a generation request, for every transport.

A transport (the gRPC servicer, the HTTP API) unpacks its wire format into plain Python values
and calls `generation_request`, then `prompt_tokens_within_limits`; both raise
InvalidRequestError naming the field. Ranges that a config key shares (temperature, top_p,
draft_tokens) come from the config's own bounds, so a default the config accepts is
always a value a request may carry. Field names are the domain's (the proto's); a transport
whose clients spell a field differently renames the error (`InvalidRequestError.renamed`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from speclora.daemon.engine.events import ChatTurn, Constraint, GenerationRequest, SamplingParams
from speclora.daemon.engine.prompt import build_prompt_tokens
from speclora.daemon.errors import InvalidRequestError
from speclora.daemon.state import ModelHub
from speclora.shared.config import (
    Bounds,
    Config,
    GenerationConfig,
    SpeculationConfig,
    bounds,
)

MODES = ("detailed", "fast")
# gRPC's field widths; JSON integers have no bound of their own.
MAX_SEED = 2**63 - 1  # PRNG keys take 64 bits
MAX_TOP_K = 2**31 - 1  # past any vocabulary: the same as 0 (off)

_TEMPERATURE = bounds(GenerationConfig, "temperature")
_TOP_P = bounds(GenerationConfig, "top_p")
_DRAFT_TOKENS = bounds(SpeculationConfig, "draft_tokens")


def check_range(field: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    """`value` must be a finite number within [lo, hi] (or (lo, hi])."""
    check_within(field, value, Bounds(lo, hi, lo_open))


def check_within(field: str, value: float, allowed: Bounds) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequestError(field, f"must be a finite number, got {value}")
    if value not in allowed:
        raise InvalidRequestError(field, f"{value} is outside {allowed}")


def _integer(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(field, f"must be an integer, got {_shown(value)}")
    return value


def _number(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(field, f"must be a number, got {_shown(value)}")
    return float(value)


def _boolean(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequestError(field, f"must be true or false, got {_shown(value)}")
    return value


def _text(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(field, f"must be a string, got {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def generation_request(
    config: Config,
    request_id: str,
    *,
    prompt: str = "",
    messages: Sequence[tuple[str, str]] = (),
    raw: bool = False,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    draft_tokens: int | None = None,
    mode: str | None = None,
    record: bool | None = None,
    use_history: bool | None = None,
    json_schema: str | Mapping[str, Any] | None = None,
    json_object: bool | None = None,
    regex: str | None = None,
    lark: str | None = None,
) -> GenerationRequest:
    """Validate every field and fill what is unset (None) from the daemon's defaults.

    `messages` are (role, content) pairs; roles and the prompt's presence are checked when the
    prompt is templated (`prompt_tokens_within_limits`). At most one of `json_schema` (its JSON
    text or the parsed object), `json_object` (true: any JSON object), `regex` and `lark` (a Lark
    grammar) constrains the output; it is compiled and checked here."""
    g, s = config.generation, config.speculation
    prompt = _text("prompt", prompt)
    for i, (role, content) in enumerate(messages):
        _text(f"messages[{i}].role", role)
        _text(f"messages[{i}].content", content)
    raw = _boolean("raw", raw)

    max_tokens = g.max_tokens if max_tokens is None else _integer("max_tokens", max_tokens)
    check_range("max_tokens", max_tokens, 1, g.max_tokens_cap)
    temperature = g.temperature if temperature is None else _number("temperature", temperature)
    check_within("temperature", temperature, _TEMPERATURE)
    top_p = g.top_p if top_p is None else _number("top_p", top_p)
    check_within("top_p", top_p, _TOP_P)
    top_k = g.top_k if top_k is None else _integer("top_k", top_k)
    if top_k < 0:
        raise InvalidRequestError("top_k", f"must be >= 0 (0 = off), got {top_k}")
    if top_k > MAX_TOP_K:
        raise InvalidRequestError("top_k", f"must be at most {MAX_TOP_K}")
    if seed is not None:
        seed = _integer("seed", seed)
        if seed < 0:
            raise InvalidRequestError("seed", f"must be >= 0, got {seed}")
        if seed > MAX_SEED:
            raise InvalidRequestError("seed", f"must be at most {MAX_SEED}")

    if len(stop) > g.max_stop_strings:
        raise InvalidRequestError("stop", f"{len(stop)} strings; at most {g.max_stop_strings}")
    for i, text in enumerate(stop):
        _text(f"stop[{i}]", text)
        if not text:
            raise InvalidRequestError(f"stop[{i}]", "is empty")
        if len(text) > g.max_stop_string_chars:
            raise InvalidRequestError(
                f"stop[{i}]", f"{len(text)} characters; at most {g.max_stop_string_chars}"
            )

    if draft_tokens is None:
        draft_tokens = s.draft_tokens
    else:
        check_within("draft_tokens", _integer("draft_tokens", draft_tokens), _DRAFT_TOKENS)
    constraint = _constraint(json_schema, json_object, regex, lark)
    if mode is None:
        # Fast mode (mlx-lm's loop) cannot mask logits: structured output runs detailed.
        mode = "detailed" if constraint is not None else s.mode
    elif mode not in MODES:
        raise InvalidRequestError("mode", f"{_shown(mode)} is not one of {', '.join(MODES)}")
    elif mode == "fast" and constraint is not None:
        raise InvalidRequestError(
            "mode",
            "fast mode cannot constrain the output; use detailed (or leave mode unset) "
            "with a schema or grammar",
        )
    record = True if record is None else _boolean("record", record)
    use_history = True if use_history is None else _boolean("use_history", use_history)

    return GenerationRequest(
        prompt=prompt,
        messages=tuple(ChatTurn(role, content) for role, content in messages),
        raw=raw,
        max_tokens=max_tokens,
        sampling=SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
        stop=tuple(stop),
        draft_tokens=draft_tokens,
        mode=mode,  # type: ignore[arg-type]
        record=record,
        use_history=use_history,
        request_id=request_id,
        constraint=constraint,
    )


def _constraint(
    json_schema: str | Mapping[str, Any] | None,
    json_object: bool | None,
    regex: str | None,
    lark: str | None,
) -> Constraint | None:
    """The one structured-output field given, compiled; InvalidRequestError naming it."""
    from speclora.daemon.engine.grammar import compile_constraint

    if json_object is not None and not _boolean("json_object", json_object):
        json_object = None
    given = {
        name: value
        for name, value in (
            ("json_schema", json_schema),
            ("json_object", json_object),
            ("regex", regex),
            ("lark", lark),
        )
        if value is not None
    }
    if not given:
        return None
    if len(given) > 1:
        raise InvalidRequestError(
            sorted(given)[1], f"give one of {', '.join(sorted(given))}, not several"
        )
    ((field, value),) = given.items()
    if field == "json_object":
        source = ""
    elif field == "json_schema" and isinstance(value, (Mapping, bool)):
        source = json.dumps(value)
    else:
        source = _text(field, value)
    try:
        return compile_constraint(field, source)
    except ValueError as exc:
        raise InvalidRequestError(field, str(exc)) from None


def prompt_tokens_within_limits(
    request: GenerationRequest, hub: ModelHub, max_prompt_tokens: int
) -> list[int]:
    """Template and tokenize the prompt (no MLX); it plus max_tokens must fit the context."""
    tokens = build_prompt_tokens(hub.tokenizer, request)
    n = len(tokens)
    field = "messages" if request.messages else "prompt"
    if n > max_prompt_tokens:
        raise InvalidRequestError(
            field, f"{n} tokens after templating; the limit is {max_prompt_tokens}"
        )
    if n + request.max_tokens > hub.max_context:
        raise InvalidRequestError(
            "max_tokens",
            f"the prompt ({n} tokens) plus max_tokens ({request.max_tokens}) exceeds the "
            f"model's context of {hub.max_context} tokens",
        )
    return tokens
