"""Turn a GenerationRequest into prompt token ids: chat template by default, raw on request.

Pure Python over the tokenizer (no MLX), so the servicer can validate and count prompt tokens
before a request ever reaches the engine worker.
"""

from __future__ import annotations

from typing import Any

from speclora.daemon.engine.events import ChatTurn, GenerationRequest
from speclora.daemon.errors import InvalidRequestError

ROLES = ("system", "user", "assistant")


def _messages(request: GenerationRequest) -> list[ChatTurn]:
    if request.messages:
        if request.prompt:
            raise InvalidRequestError("prompt", "give either a prompt or messages, not both")
        return list(request.messages)
    if not request.prompt:
        raise InvalidRequestError("prompt", "a prompt or at least one message is required")
    return [ChatTurn("user", request.prompt)]


def _check_roles(messages: list[ChatTurn]) -> None:
    for i, turn in enumerate(messages):
        if turn.role not in ROLES:
            raise InvalidRequestError(
                f"messages[{i}].role", f"{turn.role!r} is not one of {', '.join(ROLES)}"
            )
        if not isinstance(turn.content, str):
            raise InvalidRequestError(f"messages[{i}].content", "must be text")
    if all(turn.role == "system" for turn in messages):
        raise InvalidRequestError("messages", "need at least one user or assistant turn")


def _plain_transcript(messages: list[ChatTurn]) -> str:
    """For tokenizers without a chat template: a single user turn is the text itself;
    several turns become a simple 'role: text' transcript ending with 'assistant:'."""
    if len(messages) == 1 and messages[0].role == "user":
        return messages[0].content
    lines = [f"{turn.role}: {turn.content}" for turn in messages]
    if messages[-1].role != "assistant":
        lines.append("assistant:")
    return "\n".join(lines)


def _encode_raw(tokenizer: Any, text: str) -> list[int]:
    # Add the BOS token the way mlx-lm does: only if the text does not already start with it.
    bos = getattr(tokenizer, "bos_token", None)
    add_special = bos is None or not text.startswith(bos)
    return list(tokenizer.encode(text, add_special_tokens=add_special))


def build_prompt_tokens(tokenizer: Any, request: GenerationRequest) -> list[int]:
    """Token ids the target is fed before generating.

    Chat mode (default) renders `messages` (or `prompt` as one user turn) through the
    tokenizer's chat template with the assistant's turn opened; when the last turn is the
    assistant's, its text is continued instead. Raw mode encodes `prompt` exactly as given.
    Raises InvalidRequestError naming the field for anything malformed.
    """
    if request.raw:
        if request.messages:
            raise InvalidRequestError("raw", "raw mode takes a prompt, not messages")
        if not request.prompt:
            raise InvalidRequestError("prompt", "a prompt is required in raw mode")
        ids = _encode_raw(tokenizer, request.prompt)
    else:
        messages = _messages(request)
        _check_roles(messages)
        if getattr(tokenizer, "has_chat_template", False) or getattr(
            tokenizer, "chat_template", None
        ):
            dicts = [{"role": t.role, "content": t.content} for t in messages]
            continue_final = messages[-1].role == "assistant"
            try:
                ids = tokenizer.apply_chat_template(
                    dicts,
                    tokenize=True,
                    add_generation_prompt=not continue_final,
                    continue_final_message=continue_final,
                )
            except Exception as exc:  # jinja raises its own types for template errors
                raise InvalidRequestError(
                    "messages", f"the chat template rejected them: {exc}"
                ) from None
            if isinstance(ids, dict):  # some transformers versions return a BatchEncoding
                ids = ids["input_ids"]
            ids = [int(i) for i in ids]
        else:
            ids = _encode_raw(tokenizer, _plain_transcript(messages))
    if not ids:
        raise InvalidRequestError("prompt", "encodes to no tokens")
    return ids
