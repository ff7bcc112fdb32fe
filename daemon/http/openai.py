"""OpenAI's chat and completions API <-> the domain, and OpenAI's SSE framing.

No web framework here: JSON bodies (already parsed) in, dicts and SSE bytes out. A body is
unpacked into plain values for the one validation every transport shares
(daemon.requests); the fields only OpenAI has (`messages` with content parts, `stop` as a
string, `n`, `stream`, features we do not serve) are checked here, each error naming the field
as OpenAI's clients spell it. Domain error kinds map to HTTP statuses in `ERROR_STATUS`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from speclora.daemon.engine.events import (
    GenerationRequest,
    GenerationSummary,
    Source,
    TextChunk,
)
from speclora.daemon.errors import ErrorKind, InvalidRequestError, NotFoundError, error_kind
from speclora.daemon.requests import generation_request, prompt_tokens_within_limits
from speclora.daemon.state import ModelHub
from speclora.daemon.worker import GenerationResult
from speclora.shared.config import Config

Kind = Literal["chat", "completion"]

MODEL_ALIAS = "speclora"  # always names the served model, whatever it is
# OpenAI's "developer" role is its newer name for "system".
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_FINISH = {
    "eos": "stop",
    "stop_string": "stop",
    "length": "length",
    "cancelled": "length",
    "grammar_incomplete": "length",  # cut short before the schema was complete
}

# One table from the domain's error kinds to (HTTP status, OpenAI error type, code).
ERROR_STATUS: dict[ErrorKind, tuple[int, str, str | None]] = {
    ErrorKind.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    ErrorKind.FAILED_PRECONDITION: (400, "invalid_request_error", "failed_precondition"),
    ErrorKind.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    ErrorKind.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    ErrorKind.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "queue_full"),
    ErrorKind.UNAVAILABLE: (503, "server_error", "unavailable"),
    ErrorKind.DEADLINE_EXCEEDED: (504, "server_error", "deadline_exceeded"),
}


# ---------------------------------------------------------------------- errors


class ModelNotServed(NotFoundError):
    """The request names a model this daemon does not serve."""


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: Any = None
) -> dict[str, Any]:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(status, body) for a domain error; a bug (no kind) is a 500 that says so."""
    kind = error_kind(exc)
    if kind is None:
        message = f"internal error ({type(exc).__name__}: {exc}); the daemon log has the traceback"
        return 500, error_body(message, "server_error", None, "internal_error")
    status, type_, code = ERROR_STATUS[kind]
    param = exc.field if isinstance(exc, InvalidRequestError) else None
    if isinstance(exc, ModelNotServed):
        param, code = "model", "model_not_found"
    return status, error_body(str(exc), type_, param, code)


# ---------------------------------------------------------------------- requests


@dataclass(frozen=True)
class ApiRequest:
    """A validated chat or completions request, and how to answer it."""

    kind: Kind
    generation: GenerationRequest
    prompt_tokens: list[int]
    model: str  # the id answered with
    stream: bool
    include_usage: bool
    token_texts: bool = False  # extension: each chunk's text split per token


def model_aliases(hub: ModelHub, config: Config) -> tuple[str, ...]:
    """Names a request may use for the served model: its id first."""
    return tuple(dict.fromkeys((hub.target_name, config.models.target, MODEL_ALIAS)))


def parse_request(
    kind: Kind, body: Any, config: Config, hub: ModelHub, request_id: str
) -> ApiRequest:
    """Validate a chat or completions body and template its prompt (no MLX; any thread)."""
    if not isinstance(body, Mapping):
        raise InvalidRequestError("body", f"must be a JSON object, got {_json_type(body)}")
    fields = _Fields(body)
    aliases = model_aliases(hub, config)
    model = fields.get("model", str)
    if model is not None and model not in aliases:
        raise ModelNotServed(
            f"model {model[:100]!r} is not served here; this daemon serves {aliases[0]!r} "
            f"(also reachable as {', '.join(repr(a) for a in aliases[1:])})"
        )
    _refuse_unsupported(kind, fields)
    n = fields.get("n", int)
    if n is not None and n != 1:
        raise InvalidRequestError("n", f"only 1 completion per request is served, got {n}")
    stream = bool(fields.get("stream", bool))
    options = fields.get("stream_options", Mapping) or {}
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise InvalidRequestError("stream_options.include_usage", "must be true or false")
    token_texts = bool(fields.get("token_texts", bool))

    names: dict[str, str] = {}  # domain field -> the name this client used
    max_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else ""
    if max_field:
        names["max_tokens"] = max_field
    stop = body.get("stop")
    if isinstance(stop, str):
        stop, names["stop[0]"] = [stop], "stop"
    elif stop is not None and not isinstance(stop, list):
        raise InvalidRequestError("stop", f"must be a string or a list of strings, got {stop!r}")

    structured = _response_format(body.get("response_format"))
    names["json_schema"] = "response_format.json_schema.schema"
    names["json_object"] = "response_format"
    if kind == "chat":
        names["prompt"] = "messages"  # the templated prompt is made of them
        text: dict[str, Any] = {"messages": _messages(body)}
    else:
        text = {"prompt": _prompt(body), "raw": True}
    try:
        request = generation_request(
            config,
            request_id,
            **text,
            max_tokens=body.get(max_field or "max_tokens"),
            temperature=body.get("temperature"),
            top_p=body.get("top_p"),
            top_k=body.get("top_k"),
            seed=body.get("seed"),
            stop=stop or (),
            draft_tokens=body.get("draft_tokens"),
            mode=body.get("mode"),
            record=body.get("record"),
            use_history=body.get("use_history"),
            **structured,
        )
        tokens = prompt_tokens_within_limits(request, hub, config.generation.max_prompt_tokens)
    except InvalidRequestError as exc:
        if exc.field in names:
            raise exc.renamed(names[exc.field]) from None
        raise
    return ApiRequest(kind, request, tokens, aliases[0], stream, bool(include_usage), token_texts)


def _response_format(value: Any) -> dict[str, Any]:
    """OpenAI's response_format as generation_request's structured-output fields: "text",
    "json_object" (llama.cpp's form with a "schema" is a JSON schema) or "json_schema"."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidRequestError("response_format", f"must be an object, got {_json_type(value)}")
    kind = value.get("type")
    if kind == "text":
        return {}
    if kind == "json_object":
        schema = value.get("schema")
        return {"json_schema": schema} if schema is not None else {"json_object": True}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, Mapping):
            raise InvalidRequestError(
                "response_format.json_schema", f"must be an object, got {_json_type(spec)}"
            )
        schema = spec.get("schema")
        if schema is None:  # OpenAI's schema is optional: then any JSON object
            return {"json_object": True}
        if not isinstance(schema, (Mapping, bool)):
            raise InvalidRequestError(
                "response_format.json_schema.schema",
                f"must be a JSON schema object, got {_json_type(schema)}",
            )
        return {"json_schema": schema}
    raise InvalidRequestError(
        "response_format.type",
        f"{kind!r} is not one of 'text', 'json_object', 'json_schema'",
    )


class _Fields:
    """Typed reads of optional top-level fields; JSON null counts as absent."""

    def __init__(self, body: Mapping[str, Any]) -> None:
        self._body = body

    def get(self, name: str, kind: type) -> Any:
        value = self._body.get(name)
        if value is None:
            return None
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok:
            raise InvalidRequestError(name, f"must be {_KIND_NAMES[kind]}, got {_json_type(value)}")
        return value


_KIND_NAMES = {str: "a string", int: "an integer", bool: "true or false", Mapping: "an object"}


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    if value is None:
        return "null"
    return "a number" if isinstance(value, (int, float)) else type(value).__name__


def _refuse_unsupported(kind: Kind, fields: _Fields) -> None:
    """Features OpenAI has and we do not serve: a clear 400 rather than a silently different
    answer. Their "off" values (null, 0, false, empty) are accepted; tools send them."""
    body = fields._body
    if body.get("tools") or body.get("functions"):
        name = "tools" if body.get("tools") else "functions"
        raise InvalidRequestError(name, "tool calling is not supported by this server")
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise InvalidRequestError("tool_choice", "tool calling is not supported by this server")
    if body.get("logprobs") or body.get("top_logprobs"):
        name = "logprobs" if body.get("logprobs") else "top_logprobs"
        raise InvalidRequestError(name, "log probabilities are not supported by this server")
    if body.get("logit_bias"):
        raise InvalidRequestError("logit_bias", "is not supported by this server")
    for name in ("presence_penalty", "frequency_penalty"):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InvalidRequestError(name, f"must be a number, got {_json_type(value)}")
        if value:
            raise InvalidRequestError(
                name, "penalties are not supported (they would change the target's output)"
            )
    if kind == "completion":
        if body.get("echo"):
            raise InvalidRequestError("echo", "is not supported by this server")
        if body.get("suffix"):
            raise InvalidRequestError("suffix", "is not supported by this server")
        best_of = fields.get("best_of", int)
        if best_of is not None and best_of != 1:
            raise InvalidRequestError("best_of", f"only 1 is served, got {best_of}")


def _messages(body: Mapping[str, Any]) -> list[tuple[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        got = "nothing" if messages is None else _json_type(messages)
        raise InvalidRequestError("messages", f"must be a non-empty array of messages, got {got}")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise InvalidRequestError(where, f"must be an object, got {_json_type(message)}")
        role = message.get("role")
        if role in ("tool", "function"):
            raise InvalidRequestError(f"{where}.role", f"{role!r} messages need tool calling")
        if role not in _ROLES:
            raise InvalidRequestError(
                f"{where}.role", f"{str(role)[:40]!r} is not one of {', '.join(_ROLES)}"
            )
        if message.get("tool_calls"):
            raise InvalidRequestError(f"{where}.tool_calls", "tool calling is not supported")
        out.append((_ROLES[role], _content(message.get("content"), f"{where}.content")))
    return out


def _content(content: Any, where: str) -> str:
    """A string, or an array of text parts (joined by newlines, as vLLM joins them)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        got = "null" if content is None else _json_type(content)
        raise InvalidRequestError(where, f"must be a string or an array of text parts, got {got}")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, Mapping):
            raise InvalidRequestError(f"{where}[{j}]", "must be an object")
        kind = part.get("type")
        if kind != "text":
            raise InvalidRequestError(
                f"{where}[{j}].type", f"{str(kind)[:40]!r} parts are not supported (text only)"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidRequestError(f"{where}[{j}].text", "must be a string")
        texts.append(text)
    return "\n".join(texts)


def _prompt(body: Mapping[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise InvalidRequestError("prompt", f"one prompt per request, got {len(prompt)}")
        prompt = prompt[0]
        if not isinstance(prompt, str):
            raise InvalidRequestError("prompt", "token-id prompts are not supported; send text")
    if prompt is None:
        raise InvalidRequestError("prompt", "is required")
    if not isinstance(prompt, str):
        raise InvalidRequestError("prompt", f"must be a string, got {_json_type(prompt)}")
    return prompt


# ---------------------------------------------------------------------- responses


def usage(summary: GenerationSummary) -> dict[str, Any]:
    return {
        "prompt_tokens": summary.prompt_tokens,
        "completion_tokens": summary.completion_tokens,
        "total_tokens": summary.prompt_tokens + summary.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": summary.cached_prompt_tokens},
    }


def extension(result: GenerationResult) -> dict[str, Any]:
    """What speculation did for this request (our extension, beside llama.cpp's `timings`)."""
    s = result.summary
    return {
        "request_id": result.request_id,
        "proposed": s.proposed,
        "accepted": s.accepted,
        "acceptance_rate": s.acceptance_rate,
        # Proposed and accepted by source (the model draft, the history drafter), and the
        # completion tokens each supplied.
        "draft_proposed": s.draft_proposed,
        "draft_accepted": s.draft_accepted,
        "history_proposed": s.history_proposed,
        "history_accepted": s.history_accepted,
        "grammar_proposed": s.grammar_proposed,  # forced by response_format, no draft pass
        "grammar_accepted": s.grammar_accepted,
        "from_draft": sum(s.from_draft),
        "from_history": sum(s.from_history),
        "from_grammar": sum(s.from_grammar),
        "target_passes": s.target_passes,
        "tokens_per_step": s.tokens_per_step,
        "tokens_per_second": s.tokens_per_second,
        "time_to_first_token_s": s.time_to_first_token_s,
        "adapter_version": result.adapter_version,
        "mode": s.mode,
        "finish_reason": s.finish_reason,
        "failure_recorded": result.failure_recorded,
    }


def timings(summary: GenerationSummary) -> dict[str, Any]:
    """llama.cpp server's `timings` object, which some tools already read."""
    prompt_ms = summary.time_to_first_token_s * 1000
    predicted_ms = max(summary.total_time_s - summary.time_to_first_token_s, 0.0) * 1000
    prompt_n = summary.prompt_tokens - summary.cached_prompt_tokens
    predicted_n = summary.completion_tokens
    return {
        "cache_n": summary.cached_prompt_tokens,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
        "prompt_per_second": prompt_n / prompt_ms * 1000 if prompt_ms else 0.0,
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
        "predicted_per_second": predicted_n / predicted_ms * 1000 if predicted_ms else 0.0,
        "draft_n": summary.proposed,
        "draft_n_accepted": summary.accepted,
    }


def finish_reason(summary: GenerationSummary) -> str:
    """OpenAI's reasons: "stop" (EOS or a stop string) or "length". A stream cut short by the
    daemon's shutdown is "length" too; the extension's finish_reason says "cancelled"."""
    return _FINISH[summary.finish_reason]


class Answer:
    """Builds the response objects of one request, streamed or whole, as OpenAI shapes them."""

    def __init__(
        self,
        api: ApiRequest,
        created: int | None = None,
        decode: Callable[[list[int]], str] | None = None,
    ) -> None:
        """`decode` (the tokenizer's) splits each chunk's text per token when the request asked
        for `token_texts`."""
        self.api = api
        self._decode = decode if api.token_texts else None
        prefix = "chatcmpl" if api.kind == "chat" else "cmpl"
        self.id = f"{prefix}-{api.generation.request_id}"
        self.created = int(time.time()) if created is None else created
        self._object = "chat.completion" if api.kind == "chat" else "text_completion"

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.api.model}

    def whole(self, text: str, result: GenerationResult) -> dict[str, Any]:
        """The non-streamed response."""
        s = result.summary
        if self.api.kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason(s),
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(s)}
        return {
            **self._head(self._object),
            "system_fingerprint": None,
            "choices": [choice],
            "usage": usage(s),
            "timings": timings(s),
            "speclora": extension(result),
        }

    # Streaming: chunk objects, framed by `sse`.

    def _chunk(self, choice: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.api.kind == "chat" else "text_completion"
        chunk = {**self._head(obj), "system_fingerprint": None}
        chunk["choices"] = [] if choice is None else [choice]
        if self.api.include_usage:
            chunk["usage"] = None  # OpenAI: every chunk but the last has "usage": null
        chunk.update(extra)
        return chunk

    def _choice(self, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        if self.api.kind == "chat":
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": delta.get("content", ""), "logprobs": None,
                "finish_reason": finish}  # fmt: skip

    def opening(self) -> list[bytes]:
        """Sent before the first token: chat's role chunk (completions have none)."""
        if self.api.kind != "chat":
            return []
        return [sse(self._chunk(self._choice({"role": "assistant", "content": ""}, None)))]

    def content(self, chunk: TextChunk) -> bytes:
        """One engine chunk; the extension says which of its tokens came from the draft and
        which from history, and each token's text and source (what the web page colours)."""
        tokens = {
            "token_ids": list(chunk.token_ids),
            "from_draft": list(chunk.from_draft),
            "from_history": list(chunk.from_history),
            "token_sources": token_sources(chunk),
        }
        if self._decode is not None:
            tokens["token_texts"] = token_texts(chunk, self._decode)
        return sse(self._chunk(self._choice({"content": chunk.text}, None), speclora=tokens))

    def closing(self, result: GenerationResult) -> list[bytes]:
        """The finish_reason chunk (with the summary extensions), the usage chunk if asked, and
        the end marker."""
        s = result.summary
        final = self._chunk(
            self._choice({}, finish_reason(s)), timings=timings(s), speclora=extension(result)
        )
        out = [sse(final)]
        if self.api.include_usage:
            out.append(sse({**self._chunk(None), "usage": usage(s)}))
        return [*out, DONE]


def token_sources(chunk: TextChunk) -> list[Source]:
    """Per token of a chunk, who proposed it: "draft" (the model draft), "history" (the history
    drafter), or "target" (the target's own token: the one each pass adds, or a plain pass)."""
    n = len(chunk.token_ids)
    draft = chunk.from_draft or (False,) * n
    history = chunk.from_history or (False,) * n
    return [
        "draft" if d else "history" if h else "target" for d, h in zip(draft, history, strict=False)
    ]


def token_texts(chunk: TextChunk, decode: Callable[[list[int]], str]) -> list[str]:
    """The chunk's text split into one piece per token; the pieces add up to exactly the text.

    Each boundary is where the decoded prefix of the chunk's tokens stops agreeing with the
    text, so a character split across tokens goes whole to the token that completes it, and
    text the engine held back from an earlier step goes to the tokens it came from."""
    text, ids = chunk.text, list(chunk.token_ids)
    bounds, at = [], 0
    for i in range(1, len(ids)):
        prefix = decode(ids[:i])
        n = 0
        limit = min(len(prefix), len(text))
        while n < limit and prefix[n] == text[n]:
            n += 1
        at = max(at, n)
        bounds.append(at)
    edges = [0, *bounds, len(text)]
    return [text[a:b] for a, b in zip(edges, edges[1:], strict=False)]


def sse(obj: Mapping[str, Any]) -> bytes:
    """One server-sent event with a JSON payload, framed as OpenAI frames it."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def sse_error(exc: BaseException) -> bytes:
    """An error after the stream began (the status is already 200): OpenAI's error event."""
    return sse(error_response(exc)[1])


DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"  # an SSE comment: clients skip it, proxies see traffic


def model_object(hub: ModelHub, config: Config, created: int) -> dict[str, Any]:
    """The served model as /v1/models lists it; the draft and adapter in our extension."""
    aliases = model_aliases(hub, config)
    return {
        "id": aliases[0],
        "object": "model",
        "created": created,
        "owned_by": "speclora",
        "speclora": {
            "aliases": list(aliases[1:]),
            "draft": hub.draft_name,
            "adapter_version": hub.adapter_version,
            "max_context": hub.max_context,
        },
    }


def models_list(objects: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": list(objects)}
