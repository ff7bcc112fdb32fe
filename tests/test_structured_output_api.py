"""Structured output over both transports against a live in-process daemon (tiny models): the
`openai` SDK's response_format (json_schema and json_object, whole and streamed) and gRPC's
structured-output fields. Every output parses and validates; bad schemas are refused in
test_http_api.py and test_reliability_bad_input.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest
from helpers.daemons import LocalDaemon, local_daemon
from speclora.client.stub import GenerationSummary, SpecLoRAClient, TextChunk
from speclora.shared.pb import speclora_pb2 as pb

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 10},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "kind": {"enum": ["book", "film", "song"]},
    },
    "required": ["title", "year", "kind"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "work", "schema": SCHEMA, "strict": True}}
CHAT = [{"role": "user", "content": "Name a famous work as JSON."}]


@pytest.fixture(scope="module")
def daemon(
    tiny_paths: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalDaemon]:
    d = local_daemon(
        tmp_path_factory.mktemp("structured"),
        {"models": {"target": str(tiny_paths[0]), "draft": str(tiny_paths[1])}},
        learning=False,
    )
    yield d
    d.close()


def sdk(d: LocalDaemon) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://{d.server.http_address}/v1", api_key="unused", max_retries=0
    )


def test_sdk_json_schema_parses_and_validates(daemon: LocalDaemon) -> None:
    client = sdk(daemon)
    for temperature in (0.0, 1.0):
        reply = client.chat.completions.create(
            model="speclora",
            messages=CHAT,
            max_tokens=64,
            temperature=temperature,
            seed=7,
            response_format=FORMAT,  # type: ignore[arg-type]
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)
        extension = reply.model_extra["speclora"]  # type: ignore[index]
        assert extension["grammar_proposed"] > 0 and extension["from_grammar"] > 0


def test_sdk_streamed_json_object(daemon: LocalDaemon) -> None:
    stream = sdk(daemon).chat.completions.create(
        model="speclora",
        messages=CHAT,
        max_tokens=64,
        stream=True,
        response_format={"type": "json_object"},
    )
    parts, finish = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    text = "".join(parts)
    if finish == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # a random tiny model may write a long object; it is still one in the making
        assert finish == "length" and text.startswith("{")


def test_sdk_schema_cut_short_reports_length(daemon: LocalDaemon) -> None:
    reply = sdk(daemon).chat.completions.create(
        model="speclora",
        messages=CHAT,
        max_tokens=4,
        response_format=FORMAT,  # type: ignore[arg-type]
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.model_extra["speclora"]["finish_reason"] == "grammar_incomplete"  # type: ignore[index]


def test_grpc_json_schema_through_the_client_stub(daemon: LocalDaemon) -> None:
    with SpecLoRAClient(daemon.address) as c:
        events = list(c.generate("Name a work.", max_tokens=64, json_schema=SCHEMA))
    chunks = [e for e in events if isinstance(e, TextChunk)]
    summary = events[-1]
    assert isinstance(summary, GenerationSummary)
    assert summary.finish_reason == "eos"
    jsonschema.validate(json.loads("".join(c.text for c in chunks)), SCHEMA)
    assert summary.grammar_proposed >= summary.grammar_accepted > 0
    assert sum(g for c in chunks for g in c.from_grammar) == summary.grammar_accepted
    assert summary.mode == "detailed"


def test_grpc_regex_lark_and_incomplete(daemon: LocalDaemon) -> None:
    def run(**fields: object) -> tuple[str, pb.GenerationSummary]:
        fields.setdefault("prompt", "Hi")
        fields.setdefault("max_tokens", 40)
        events = list(daemon.stub.Generate(pb.GenerateRequest(**fields), timeout=60))
        return "".join(e.chunk.text for e in events if e.HasField("chunk")), events[-1].summary

    text, summary = run(regex="[0-9]{3}-[a-z]{2}")
    assert summary.finish_reason == pb.FINISH_REASON_EOS
    assert len(text) == 6 and text[3] == "-" and text[:3].isdigit()
    text, summary = run(lark='start: "<" ("x" | "y")+ ">"', max_tokens=20)
    assert text.startswith("<") and set(text[1:].rstrip(">")) <= {"x", "y"}
    _, summary = run(json_schema=json.dumps(SCHEMA), max_tokens=3)
    assert summary.finish_reason == pb.FINISH_REASON_GRAMMAR_INCOMPLETE
    # Structured output with the default mode runs detailed; fast is refused (bad input tests).
    assert summary.mode == pb.MODE_DETAILED
