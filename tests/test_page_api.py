"""The web page's server side, without a browser: GET / and its files, GET /api/stats (the Stats
RPC as JSON), GET /api/timeline (bounded per-request points and training runs), the per-token
sources in streamed chunks, and the same security rules as the API. Tiny models, in-process."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import json_format
from helpers.daemons import LocalDaemon, local_daemon, wait_until
from helpers.httpcheck import post, request, sse_events
from speclora.daemon.http import dashboard
from speclora.daemon.learning.events import (
    TrainEvaluation,
    TrainProgress,
    TrainResult,
    TrainStarted,
    TrainTick,
)
from speclora.daemon.stats import TRAINING_TASK
from speclora.daemon.timeline import MAX_LOSS_POINTS, Timeline
from speclora.shared.pb import speclora_pb2 as pb

BOUND = 3
KEY = "page-key-0123456789"


@pytest.fixture(scope="module")
def daemon(
    tiny_paths: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalDaemon]:
    # self:4 of the 4-layer target is the target itself: at T = 0 every proposal is accepted.
    d = local_daemon(
        tmp_path_factory.mktemp("page"),
        {
            "models": {"target": str(tiny_paths[0]), "draft": "self:4"},
            "server": {"timeline_requests": BOUND},
        },
        learning=False,
    )
    yield d
    d.close()


@pytest.fixture(scope="module")
def keyed(
    tiny_paths: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalDaemon]:
    home = tmp_path_factory.mktemp("page-keyed")
    key_file = home / "api-key"
    key_file.write_text(KEY)
    key_file.chmod(0o600)
    d = local_daemon(
        home,
        {
            "models": {"target": str(tiny_paths[0]), "draft": "none"},
            "server": {"http_api_key_file": str(key_file)},
        },
        learning=False,
    )
    yield d
    d.close()


def get_json(d: LocalDaemon, path: str) -> dict:
    reply = request(d.server.http_address, "GET", path)
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == "application/json"
    return reply.json()


def test_the_page_and_its_files_are_served_with_a_strict_policy(daemon: LocalDaemon) -> None:
    address = daemon.server.http_address
    page = request(address, "GET", "/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    html = page.body.decode()
    assert 'src="/page/page.js"' in html and 'href="/page/page.css"' in html
    assert "http://" not in html.replace('xmlns="http://www.w3.org', "")  # nothing from elsewhere
    for name, kind in (("page.js", "text/javascript"), ("page.css", "text/css")):
        reply = request(address, "GET", f"/page/{name}")
        assert reply.status == 200 and reply.headers["content-type"].startswith(kind)
        assert reply.body == dashboard.asset(name)
    for missing in ("/page/nope.js", "/page/index.html", "/page/..%2Fapp.py"):
        assert request(address, "GET", missing).status == 404, missing


def test_api_stats_is_the_stats_rpc_as_json(daemon: LocalDaemon) -> None:
    post(daemon.server.http_address, "/v1/completions", {"prompt": "Hi", "max_tokens": 3})
    body = get_json(daemon, "/api/stats")
    rpc = json_format.MessageToDict(
        daemon.stub.GetStats(pb.GetStatsRequest()),
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
    proto_fields = {f.name for f in pb.StatsSnapshot.DESCRIPTOR.fields}
    deprecated = {"training_state_name", "blas_name"}  # the enums' string twins
    assert set(body) - {"daemon"} == proto_fields - deprecated
    assert body["training_state"] == "idle" == rpc["training_state_name"]
    assert body["blas"] == rpc["blas_name"] and body["default_mode"] == "detailed"
    for name in ("target_model", "draft_model", "requests_total", "tokens_total", "pid"):
        assert str(body[name]) == str(rpc[name]), name
    assert body["requests_total"] >= 1
    assert math.isclose(body["acceptance_lifetime"], rpc["acceptance_lifetime"], rel_tol=1e-6)
    now = body["daemon"]
    assert now["device"] in ("cpu", "gpu (Metal)", "gpu (CUDA)") and now["cpu_count"] >= 1
    assert now["auto_train"]["enabled"] is body["auto_train"] and now["memory_total_bytes"] > 0


def test_the_timeline_keeps_every_request_up_to_its_bound(daemon: LocalDaemon) -> None:
    address = daemon.server.http_address
    before = get_json(daemon, "/api/timeline")["last_seq"]
    for i in range(BOUND + 2):
        reply = post(address, "/v1/completions", {"prompt": f"Point {i}", "max_tokens": 4})
        assert reply.status == 200
    body = get_json(daemon, "/api/timeline")
    assert body["max_requests"] == BOUND and body["last_seq"] == before + BOUND + 2
    seqs = [p["seq"] for p in body["requests"]]
    assert seqs == list(range(before + 3, before + BOUND + 3))  # the oldest went first
    last = body["requests"][-1]
    assert last["completion_tokens"] == 4 and last["adapter_version"] == ""
    assert last["proposed"] > 0 and last["acceptance"] == 1.0  # the draft is the target
    assert last["tokens_per_pass"] > 1 and last["tokens_per_second"] > 0
    assert last["from_draft"] + last["from_history"] <= last["completion_tokens"]
    newer = get_json(daemon, f"/api/timeline?since={body['last_seq'] - 1}")
    assert [p["seq"] for p in newer["requests"]] == [body["last_seq"]]
    bad = request(address, "GET", "/api/timeline?since=-1")
    assert bad.status == 400 and bad.error["param"] == "since"


def test_streamed_chunks_name_each_tokens_source_and_text(daemon: LocalDaemon) -> None:
    body = {
        "messages": [{"role": "user", "content": "Tell me about rivers."}],
        "max_tokens": 12,
        "stream": True,
    }
    for texts in (True, False):
        reply = post(
            daemon.server.http_address, "/v1/chat/completions", {**body, "token_texts": texts}
        )
        assert reply.status == 200
        chunks = [json.loads(e) for e in sse_events(reply.body) if e != b"[DONE]"]
        content = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
        assert content
        sources = []
        for c in content:
            ext = c["speclora"]
            assert len(ext["token_sources"]) == len(ext["token_ids"])
            history = ext["from_history"] or [False] * len(ext["token_ids"])
            for source, draft, hist in zip(
                ext["token_sources"], ext["from_draft"], history, strict=True
            ):
                assert source == ("draft" if draft else "history" if hist else "target")
            sources += ext["token_sources"]
            if texts:
                assert "".join(ext["token_texts"]) == c["choices"][0]["delta"]["content"]
                assert len(ext["token_texts"]) == len(ext["token_ids"])
            else:
                assert "token_texts" not in ext
        assert "target" in sources and {"draft", "history"} & set(sources)
    bad = post(daemon.server.http_address, "/v1/chat/completions", {**body, "token_texts": 1})
    assert bad.status == 400 and bad.error["param"] == "token_texts"


def _fake_run(losses: list[float], promoted: bool) -> Iterator[object]:
    yield TrainStarted(train_cases=6, heldout_cases=2, steps=len(losses), parent_version="")
    yield TrainTick("teacher", 1, 1)
    yield TrainEvaluation("before", 0.4)
    for i, loss in enumerate(losses, 1):
        yield TrainProgress(i, len(losses), loss, 100.0)
    yield TrainEvaluation("after", 0.5 if promoted else 0.39)
    yield TrainResult("v0009", promoted, "because", 0.4, 0.5 if promoted else 0.39, 1.5)


def _failing_run() -> Iterator[object]:
    yield TrainStarted(train_cases=6, heldout_cases=2, steps=3, parent_version="v0009")
    raise RuntimeError("out of cheese")


def test_training_runs_are_marked_on_the_timeline(daemon: LocalDaemon) -> None:
    """The worker feeds a training task's events to the timeline (a stand-in task here: the
    real run is tests/test_page.py's, and the learning loop's own tests)."""
    worker = daemon.worker
    for factory in (lambda hub: _fake_run([2.0, 1.5, 1.0], False), lambda hub: _failing_run()):
        job = worker.submit_task(TRAINING_TASK, factory)
        with contextlib.suppress(RuntimeError):  # the failing run's error
            list(job)
        wait_until(lambda: worker.task_state(TRAINING_TASK) != "running", what="task ended")
    post(daemon.server.http_address, "/v1/completions", {"prompt": "After", "max_tokens": 2})
    body = get_json(daemon, "/api/timeline")
    rejected, failed = body["training_runs"][-2:]
    assert rejected["outcome"] == "rejected" and rejected["adapter_version"] == "v0009"
    assert rejected["losses"] == [[1, 2.0], [2, 1.5], [3, 1.0]]
    assert rejected["heldout_before"] == 0.4 and rejected["heldout_after"] == 0.39
    assert rejected["train_cases"] == 6 and rejected["heldout_cases"] == 2
    assert rejected["reason"] == "because" and rejected["finished_at"] >= rejected["started_at"]
    assert failed["outcome"] == "failed" and failed["parent_version"] == "v0009"
    assert failed["seq"] == rejected["seq"] + 1
    # Drawn between the requests around it: the one after has a higher seq.
    assert body["requests"][-1]["seq"] > failed["requests_before"]


def test_a_long_loss_curve_stays_bounded_and_json_safe() -> None:
    timeline = Timeline(10)
    for event in _fake_run([float("nan"), *range(1, 3 * MAX_LOSS_POINTS)], True):
        timeline.training_event(event)
    timeline.training_ended("promoted")
    _, (run,), _ = timeline.snapshot()
    data = json.loads(json.dumps(run.to_json(), allow_nan=False))
    assert len(data["losses"]) <= MAX_LOSS_POINTS
    assert data["losses"][-1] == [3 * MAX_LOSS_POINTS, 3 * MAX_LOSS_POINTS - 1]
    assert data["losses"][0][1] is None  # NaN becomes null
    assert data["outcome"] == "promoted" and data["promoted"] is True


@pytest.mark.parametrize("path", ["/", "/page/page.js", "/api/stats", "/api/timeline"])
def test_a_foreign_host_is_refused(daemon: LocalDaemon, path: str) -> None:
    reply = request(daemon.server.http_address, "GET", path, headers={"Host": "evil.example"})
    assert reply.status == 403 and reply.error["code"] == "host_not_allowed"
    cross = request(
        daemon.server.http_address, "GET", path, headers={"Origin": "http://evil.example"}
    )
    assert cross.status == 403 and "access-control-allow-origin" not in cross.headers


def test_with_a_key_the_page_loads_and_its_data_needs_the_key(keyed: LocalDaemon) -> None:
    address = keyed.server.http_address
    for path in ("/", "/page/page.js", "/page/page.css"):
        assert request(address, "GET", path).status == 200, path
    auth = {"Authorization": f"Bearer {KEY}"}
    for path in ("/api/stats", "/api/timeline"):
        assert request(address, "GET", path).status == 401, path
        assert request(address, "GET", path, headers=auth).status == 200, path
    assert (
        request(address, "POST", "/", b"{}", headers={"Content-Type": "application/json"}).status
        == 401
    )


def test_token_texts_add_up_to_the_chunk_text_whatever_the_decoder_does() -> None:
    from speclora.daemon.engine.events import TextChunk
    from speclora.daemon.http.openai import token_texts

    def decode(ids: list[int]) -> str:  # byte-level BPE: token 3 holds half of "é"
        raw = {1: b"Hel", 2: b"lo", 3: b"\xc3", 4: b"\xa9 w\xc3\xb6rld"}
        return b"".join(raw[i] for i in ids).decode(errors="replace")

    chunk = TextChunk("Helloé wörld", (1, 2, 3, 4), (False, True, True, False))
    assert token_texts(chunk, decode) == ["Hel", "lo", "", "é wörld"]
    # Text held back from an earlier step (not in this chunk's tokens) goes to the last token.
    held = TextChunk("xHello", (1, 2), (False, False))
    assert "".join(token_texts(held, decode)) == "xHello"
