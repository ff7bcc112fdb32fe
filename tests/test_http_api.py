"""The OpenAI-compatible HTTP API against a live in-process daemon (tiny models), through the
official `openai` package and through raw HTTP for the bytes on the wire.

One daemon serves most of the module; a second one with a single engine slot serves the tests
about waiting, cancelling and a full queue.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from helpers.daemons import LocalDaemon, local_daemon, wait_until
from helpers.httpcheck import JSON, open_stream, post, read_until, request, sse_events
from speclora.shared.pb import speclora_pb2 as pb

LONG = 2000  # tokens: with a short prompt, just inside the tiny model's 2048 context
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def daemon(
    tiny_paths: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalDaemon]:
    # self:4 of a 4-layer target is the target itself: every proposal accepted at T = 0.
    d = local_daemon(
        tmp_path_factory.mktemp("http"),
        {
            "models": {"target": str(tiny_paths[0]), "draft": "self:4"},
            "server": {"max_active": 4, "queue_size": 8},
        },
        learning=False,
    )
    yield d
    d.close()


@pytest.fixture(scope="module")
def single(
    tiny_paths: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalDaemon]:
    """One engine slot, one queue place, keep-alive comments every 50 ms."""
    d = local_daemon(
        tmp_path_factory.mktemp("http1"),
        {
            "models": {"target": str(tiny_paths[0]), "draft": str(tiny_paths[1])},
            "server": {"max_active": 1, "queue_size": 1, "http_keepalive_s": 0.05},
        },
        learning=False,
    )
    yield d
    d.close()


def client(d: LocalDaemon, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://{d.server.http_address}/v1", api_key="unused", max_retries=0, **kw
    )


def grpc_text(d: LocalDaemon, **fields: object) -> tuple[str, pb.GenerationSummary]:
    events = list(d.stub.Generate(pb.GenerateRequest(**fields), timeout=60))
    return "".join(e.chunk.text for e in events if e.HasField("chunk")), events[-1].summary


def grpc_messages(messages: list[dict[str, str]]) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages]


# ---------------------------------------------------------------------- models


def test_models_lists_the_target_with_its_draft_and_adapter(daemon: LocalDaemon) -> None:
    api = client(daemon)
    models = api.models.list().data
    assert [m.id for m in models] == ["tiny-target"]
    extra = models[0].model_extra["speclora"]
    assert extra["draft"] == "tiny-target[self:4]" and extra["adapter_version"] == ""
    assert "speclora" in extra["aliases"]
    for name in ("tiny-target", "speclora"):
        assert api.models.retrieve(name).id == "tiny-target"
    with pytest.raises(openai.NotFoundError) as err:
        api.models.retrieve("gpt-4o")
    assert err.value.status_code == 404


def test_an_unknown_model_is_a_404_naming_the_field(daemon: LocalDaemon) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client(daemon).chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=4)
    assert err.value.body["param"] == "model" and err.value.body["code"] == "model_not_found"
    assert "tiny-target" in err.value.body["message"]  # it says what is served


# ---------------------------------------------------------------------- generation


def test_chat_at_t0_is_grpcs_output_token_for_token(daemon: LocalDaemon) -> None:
    reply = client(daemon).chat.completions.create(
        model="tiny-target", messages=CHAT, max_tokens=24, temperature=0
    )
    text, summary = grpc_text(daemon, messages=grpc_messages(CHAT), max_tokens=24, temperature=0.0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == "tiny-target"
    assert choice.finish_reason == (
        "length" if summary.finish_reason == pb.FINISH_REASON_LENGTH else "stop"
    )
    usage = reply.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        summary.prompt_tokens,
        summary.completion_tokens,
    )
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    ext = reply.model_extra["speclora"]
    # The target drafting for itself: every proposal accepted, and so from the draft.
    assert ext["proposed"] > 0 and ext["accepted"] == ext["proposed"]
    assert 0 < ext["from_draft"] <= ext["accepted"]
    assert ext["target_passes"] < usage.completion_tokens
    assert ext["adapter_version"] == "" and ext["mode"] == "detailed"
    timings = reply.model_extra["timings"]
    assert timings["draft_n"] == ext["proposed"] and timings["predicted_n"] == 24


def test_completions_are_raw_text_continuation_like_grpc_raw(daemon: LocalDaemon) -> None:
    reply = client(daemon).completions.create(
        model="speclora", prompt="Once upon a time", max_tokens=16, temperature=0
    )
    text, summary = grpc_text(
        daemon, prompt="Once upon a time", raw=True, max_tokens=16, temperature=0.0
    )
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.choices[0].text == text
    assert reply.usage.prompt_tokens == summary.prompt_tokens


def test_streamed_chat_adds_up_to_the_whole_answer(daemon: LocalDaemon) -> None:
    api = client(daemon)
    whole = api.chat.completions.create(model="speclora", messages=CHAT, max_tokens=20)
    chunks = list(
        api.chat.completions.create(
            model="speclora",
            messages=CHAT,
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])
    # The streamed tokens say which came from the draft, and add up to the summary's count.
    tokens = [c.model_extra["speclora"] for c in chunks if c.choices and c.choices[0].delta.content]
    drafted = sum(sum(t["from_draft"]) for t in tokens)
    assert drafted == finals[0].model_extra["speclora"]["from_draft"] > 0
    assert sum(len(t["token_ids"]) for t in tokens) == 20


def test_streamed_completions(daemon: LocalDaemon) -> None:
    api = client(daemon)
    whole = api.completions.create(model="speclora", prompt="The sea", max_tokens=12)
    chunks = list(
        api.completions.create(model="speclora", prompt="The sea", max_tokens=12, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # not asked for


def test_stop_strings_end_the_answer_before_them(daemon: LocalDaemon) -> None:
    api = client(daemon)
    full = api.completions.create(model="speclora", prompt="Hi", max_tokens=40).choices[0].text
    assert len(full) > 6, full
    stop = full[3:5]
    for form in (stop, [stop, "never-in-the-output-\u2603"]):
        reply = api.completions.create(model="speclora", prompt="Hi", max_tokens=40, stop=form)
        text = reply.choices[0].text
        assert reply.choices[0].finish_reason == "stop"
        assert stop not in text and full.startswith(text) and len(text) < len(full)
        assert reply.model_extra["speclora"]["finish_reason"] == "stop_string"


def test_a_seed_reproduces_a_sampled_answer(daemon: LocalDaemon) -> None:
    api = client(daemon)

    def sample(seed: int) -> str:
        reply = api.chat.completions.create(
            model="speclora", messages=CHAT, max_tokens=24, temperature=1.0, seed=seed
        )
        return reply.choices[0].message.content

    first = sample(7)
    assert sample(7) == first
    assert any(sample(seed) != first for seed in (8, 9, 10))


def test_a_repeated_prompt_reports_its_cached_tokens(daemon: LocalDaemon) -> None:
    api = client(daemon)
    messages = [{"role": "user", "content": "A prompt the cache will keep, then reuse."}]
    api.chat.completions.create(model="speclora", messages=messages, max_tokens=6)
    again = api.chat.completions.create(model="speclora", messages=messages, max_tokens=6)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < again.usage.prompt_tokens
    assert again.model_extra["timings"]["cache_n"] == cached


def test_content_parts_and_the_developer_role_are_understood(daemon: LocalDaemon) -> None:
    parts = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello there"}]},
    ]
    api = client(daemon)
    a = api.chat.completions.create(model="speclora", messages=parts, max_tokens=10)
    b = api.chat.completions.create(model="speclora", messages=CHAT, max_tokens=10)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


# ---------------------------------------------------------------------- SSE framing


FRAME = re.compile(rb"(data: \{[^\n]*\}\n\n)+data: \[DONE\]\n\n")


def test_sse_bytes_are_framed_as_openai_frames_them(daemon: LocalDaemon) -> None:
    body = {
        "messages": CHAT,
        "max_tokens": 8,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    reply = post(daemon.server.http_address, "/v1/chat/completions", body)
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    assert reply.headers["cache-control"] == "no-cache"
    assert FRAME.fullmatch(reply.body), reply.body[-300:]
    events = sse_events(reply.body)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    # Order: content chunks, the finish_reason chunk, the usage chunk (no choices), [DONE].
    *content, final, usage = chunks
    assert all(c["choices"][0]["finish_reason"] is None for c in content)
    assert final["choices"][0]["finish_reason"] == "length" and final["choices"][0]["delta"] == {}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
    assert all(c["usage"] is None for c in [*content, final])


def test_sse_without_include_usage_has_no_usage_fields(daemon: LocalDaemon) -> None:
    reply = post(
        daemon.server.http_address,
        "/v1/completions",
        {"prompt": "Hi", "max_tokens": 5, "stream": True},
    )
    assert FRAME.fullmatch(reply.body)
    chunks = [json.loads(e) for e in sse_events(reply.body)[:-1]]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert {c["object"] for c in chunks} == {"text_completion"}


def test_keep_alive_comments_while_waiting_for_the_first_token(single: LocalDaemon) -> None:
    """With the only slot busy, a streamed request waits in the queue: the stream opens at
    once and carries SSE comments until its tokens come."""
    address = single.server.http_address
    busy = open_stream(address, {"prompt": "x", "max_tokens": LONG, "stream": True})
    try:
        wait_until(lambda: single.worker.active_count == 1, what="the slot is busy")
        waiting = open_stream(address, {"prompt": "y", "max_tokens": 4, "stream": True})
        head = read_until(waiting, b": keep-alive\n\n", 5.0)
        assert b"data: " not in head  # completions have no role chunk: nothing before tokens
        waiting.close()
    finally:
        busy.close()
    wait_until(lambda: single.worker.active_count == 0, what="both cancelled")


# ---------------------------------------------------------------------- disconnects and load


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_frees_its_slot_at_once(single: LocalDaemon, stream: bool) -> None:
    address = single.server.http_address
    cancelled = single.worker.stats.snapshot().requests_cancelled
    sock = open_stream(address, {"prompt": "x", "max_tokens": LONG, "stream": stream})
    wait_until(lambda: single.worker.active_count == 1, what="the long request runs")
    if stream:
        read_until(sock, b'"text"', 10)  # tokens are flowing
    sock.close()
    left = time.monotonic()
    wait_until(lambda: single.worker.active_count == 0, timeout=2, what="the slot is free")
    # The next request starts at once: it does not wait for the first one's 2000 tokens.
    reply = client(single).completions.create(model="speclora", prompt="y", max_tokens=4)
    assert reply.usage.completion_tokens == 4
    assert time.monotonic() - left < 2
    assert single.worker.stats.snapshot().requests_cancelled == cancelled + 1


def test_a_full_queue_is_a_rate_limit_error(single: LocalDaemon) -> None:
    address = single.server.http_address
    busy = open_stream(address, {"prompt": "x", "max_tokens": LONG, "stream": True})
    wait_until(lambda: single.worker.active_count == 1, what="slot taken")
    queued = open_stream(address, {"prompt": "y", "max_tokens": LONG, "stream": True})
    try:
        wait_until(lambda: single.worker.queue_depth == 1, what="queue full")
        with pytest.raises(openai.RateLimitError) as err:
            client(single).completions.create(model="speclora", prompt="z", max_tokens=4)
        assert err.value.status_code == 429 and err.value.body["code"] == "queue_full"
        assert err.value.response.headers["retry-after"] == "1"
    finally:
        queued.close()
        busy.close()
    wait_until(lambda: single.worker.active_count == 0 and single.worker.queue_depth == 0)


# ---------------------------------------------------------------------- bad requests


OK_CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
BAD: list[tuple[str, str, dict, str]] = [
    # (what, route, body, the field the 400 names)
    ("max_tokens 0", "chat", {**OK_CHAT, "max_tokens": 0}, "max_tokens"),
    ("max_tokens past the cap", "chat", {**OK_CHAT, "max_tokens": 10**6}, "max_tokens"),
    ("max_tokens a string", "chat", {**OK_CHAT, "max_tokens": "8"}, "max_tokens"),
    ("max_tokens a float", "chat", {**OK_CHAT, "max_tokens": 8.5}, "max_tokens"),
    ("max_completion_tokens -1", "chat", {**OK_CHAT, "max_completion_tokens": -1}, "max_completion_tokens"),
    ("prompt + max_tokens past the context", "completion", {"prompt": "a " * 100, "max_tokens": 4000}, "max_tokens"),
    ("temperature 3", "chat", {**OK_CHAT, "temperature": 3}, "temperature"),
    ("temperature a bool", "chat", {**OK_CHAT, "temperature": True}, "temperature"),
    ("top_p 0", "chat", {**OK_CHAT, "top_p": 0}, "top_p"),
    ("top_p 1.5", "completion", {"prompt": "Hi", "top_p": 1.5}, "top_p"),
    ("seed negative", "chat", {**OK_CHAT, "seed": -1}, "seed"),
    ("seed past 64 bits", "chat", {**OK_CHAT, "seed": 2**70}, "seed"),
    ("stop empty string", "chat", {**OK_CHAT, "stop": ""}, "stop"),
    ("stop list with a number", "chat", {**OK_CHAT, "stop": ["a", 5]}, "stop[1]"),
    ("stop an object", "chat", {**OK_CHAT, "stop": {"a": 1}}, "stop"),
    ("too many stop strings", "chat", {**OK_CHAT, "stop": [str(i) for i in range(40)]}, "stop"),
    ("n 2", "chat", {**OK_CHAT, "n": 2}, "n"),
    ("messages missing", "chat", {"max_tokens": 4}, "messages"),
    ("messages empty", "chat", {"messages": []}, "messages"),
    ("messages a string", "chat", {"messages": "hi"}, "messages"),
    ("message not an object", "chat", {"messages": ["hi"]}, "messages[0]"),
    ("unknown role", "chat", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("tool role", "chat", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ("content null", "chat", {"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ("image part", "chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content[0].type"),
    ("only a system turn", "chat", {"messages": [{"role": "system", "content": "x"}]}, "messages"),
    ("tools", "chat", {**OK_CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("response_format a string", "chat", {**OK_CHAT, "response_format": "json"}, "response_format"),
    ("response_format type xml", "chat", {**OK_CHAT, "response_format": {"type": "xml"}}, "response_format.type"),
    ("json_schema not an object", "chat", {**OK_CHAT, "response_format": {"type": "json_schema", "json_schema": 5}}, "response_format.json_schema"),
    ("json_schema schema a string", "chat", {**OK_CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}}}, "response_format.json_schema.schema"),
    ("json_schema bad schema", "completion", {"prompt": "Hi", "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}}, "response_format.json_schema.schema"),
    ("json_object in fast mode", "chat", {**OK_CHAT, "mode": "fast", "response_format": {"type": "json_object"}}, "mode"),
    ("logprobs", "chat", {**OK_CHAT, "logprobs": True}, "logprobs"),
    ("presence_penalty", "chat", {**OK_CHAT, "presence_penalty": 0.5}, "presence_penalty"),
    ("stream a string", "chat", {**OK_CHAT, "stream": "yes"}, "stream"),
    ("include_usage a string", "chat", {**OK_CHAT, "stream": True, "stream_options": {"include_usage": "y"}}, "stream_options.include_usage"),
    ("model a number", "chat", {**OK_CHAT, "model": 4}, "model"),
    ("draft_tokens 17", "chat", {**OK_CHAT, "draft_tokens": 17}, "draft_tokens"),
    ("mode turbo", "chat", {**OK_CHAT, "mode": "turbo"}, "mode"),
    ("prompt missing", "completion", {"max_tokens": 4}, "prompt"),
    ("prompt empty", "completion", {"prompt": ""}, "prompt"),
    ("prompt token ids", "completion", {"prompt": [[1, 2, 3]]}, "prompt"),
    ("two prompts", "completion", {"prompt": ["a", "b"]}, "prompt"),
    ("echo", "completion", {"prompt": "Hi", "echo": True}, "echo"),
    ("best_of 3", "completion", {"prompt": "Hi", "best_of": 3}, "best_of"),
    ("body an array", "chat", [1, 2], "body"),  # type: ignore[list-item]
]  # fmt: skip


def test_every_bad_request_is_a_400_naming_the_field(daemon: LocalDaemon) -> None:
    address = daemon.server.http_address
    routes = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}
    problems = []
    for what, route, body, field in BAD:
        reply = post(address, routes[route], body)
        error = reply.error
        if (
            reply.status != 400
            or error["param"] != field
            or error["type"] != "invalid_request_error"
        ):
            problems.append(f"{what}: {reply.status} {error}")
        elif field.split("[")[0].split(".")[0] not in error["message"]:
            problems.append(f"{what}: the message does not name {field}: {error['message']}")
    assert not problems, "\n".join(problems)
    assert len(BAD) >= 20
    # Not JSON at all, and the daemon still serves.
    for raw in (
        b"{not json",
        b"\xff\xfe",
        b"[" * 100_000,
        b'{"max_tokens": 1' + b"0" * 5000 + b"}",
    ):
        reply = request(address, "POST", routes["chat"], raw, JSON)
        assert reply.status == 400 and reply.error["param"] == "body", (raw[:20], reply.body)
    assert post(address, routes["chat"], OK_CHAT).status == 200
    assert daemon.worker.alive


def test_the_sdk_raises_bad_request_error(daemon: LocalDaemon) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client(daemon).chat.completions.create(
            model="speclora", messages=CHAT, max_tokens=8, temperature=9
        )
    assert err.value.status_code == 400 and err.value.body["param"] == "temperature"


def test_unknown_fields_and_off_values_are_accepted(daemon: LocalDaemon) -> None:
    body = {
        **OK_CHAT,
        "user": "someone",
        "frequency_penalty": 0,
        "presence_penalty": 0.0,
        "tools": [],
        "tool_choice": "none",
        "logprobs": False,
        "response_format": {"type": "text"},
        "n": 1,
        "some_future_field": {"x": 1},
    }
    assert post(daemon.server.http_address, "/v1/chat/completions", body).status == 200


def test_routes_and_methods_that_do_not_exist(daemon: LocalDaemon) -> None:
    address = daemon.server.http_address
    missing = request(address, "GET", "/v1/embeddings")
    assert missing.status == 404 and missing.error["code"] == "not_found"
    wrong = request(address, "GET", "/v1/chat/completions")
    assert wrong.status == 405 and wrong.error["code"] == "method_not_allowed"


# ---------------------------------------------------------------------- lifecycle


def test_health_and_the_http_api_can_be_turned_off(
    daemon: LocalDaemon, tiny_paths: tuple[Path, Path], tmp_path: Path
) -> None:
    assert request(daemon.server.http_address, "GET", "/health").json() == {"status": "ok"}
    off = local_daemon(
        tmp_path,
        {
            "models": {"target": str(tiny_paths[0]), "draft": "none"},
            "server": {"http_address": None},
        },
        learning=False,
    )
    try:
        assert off.server.http is None and off.server.http_address is None
    finally:
        off.close()


def test_503_while_loading_and_while_shutting_down(
    tiny_paths: tuple[Path, Path], tmp_path: Path
) -> None:
    from helpers.daemons import local_config
    from speclora.daemon.server import open_http

    config, paths = local_config(tmp_path / "a", {})
    loading = open_http(config, paths)  # what `serve` opens before loading the models
    assert loading is not None
    try:
        health = request(loading.address, "GET", "/health")
        assert health.status == 503 and health.json() == {"status": "loading"}
        reply = post(loading.address, "/v1/chat/completions", OK_CHAT)
        assert reply.status == 503 and "loading" in reply.error["message"]
        assert reply.headers["retry-after"] == "1"
    finally:
        loading.stop()

    d = local_daemon(
        tmp_path / "b",
        {"models": {"target": str(tiny_paths[0]), "draft": "none"}},
        learning=False,
    )
    address = d.server.http_address
    stream = open_stream(address, {"prompt": "x", "max_tokens": LONG, "stream": True})
    wait_until(lambda: d.worker.active_count == 1, what="a stream runs")
    closing = threading.Thread(target=d.close, kwargs={"grace_s": 30})
    closing.start()
    try:
        wait_until(lambda: request(address, "GET", "/health").status == 503, what="503")
        reply = post(address, "/v1/completions", {"prompt": "y", "max_tokens": 2})
        assert reply.status == 503 and "shutting down" in reply.error["message"]
        # The running stream is let finish: it ends with its summary and [DONE].
        read_until(stream, b"data: [DONE]\n\n", 60)
    finally:
        stream.close()
        closing.join(60)
    with pytest.raises(OSError):
        request(address, "GET", "/health", timeout=2)  # stopped listening


def test_serve_runs_the_http_api_and_logs_its_url(tiny_target_path: Path, tmp_path: Path) -> None:
    from helpers.daemons import daemon_env, log_events, start_daemon

    home, log = tmp_path / "home", tmp_path / "serve.log"
    proc = start_daemon(daemon_env(home, tiny_target_path), home, log)
    try:
        url = log_events(log, "daemon_ready")[0]["http"]
        address = url.removeprefix("http://")
        assert request(address, "GET", "/health").json() == {"status": "ok"}
        api = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        reply = api.chat.completions.create(model="speclora", messages=CHAT, max_tokens=4)
        assert reply.usage.completion_tokens == 4
    finally:
        proc.terminate()
        assert proc.wait(60) == 0


def test_one_http_connection_serves_many_requests(daemon: LocalDaemon) -> None:
    conn = http.client.HTTPConnection(daemon.server.http_address, timeout=30)
    try:
        for _ in range(3):
            conn.request(
                "POST",
                "/v1/completions",
                json.dumps({"prompt": "Hi", "max_tokens": 2}),
                {"Content-Type": "application/json"},
            )
            response = conn.getresponse()
            assert response.status == 200 and json.loads(response.read())["usage"]
    finally:
        conn.close()
