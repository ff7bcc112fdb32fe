"""Bad input through the real server: every field of every RPC at and past its limits.

Each bad request must end in INVALID_ARGUMENT (or the documented code) with a message that names
the field, and the daemon must still be SERVING and answering afterwards. Requests exactly at a
limit must be served. Run with -s to see the figures.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message
from helpers.daemons import SERVING, LocalDaemon, local_daemon
from speclora.shared.pb import speclora_pb2 as pb

INT32_MAX, INT32_MIN = 2**31 - 1, -(2**31)
INT64_MAX, INT64_MIN = 2**63 - 1, -(2**63)
CAP = 64  # generation.max_tokens_cap
MAX_PROMPT = 2000  # generation.max_prompt_tokens
CONTEXT = 2048  # the tiny target's context
MAX_MESSAGE = 64 * 1024  # server.max_message_bytes
Q = "Q"  # one token per character in the tiny tokenizer (raw mode adds no BOS)

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
NOT_FOUND = grpc.StatusCode.NOT_FOUND
METHODS = {m.name: m for m in pb.DESCRIPTOR.services_by_name["SpecLoRA"].methods}
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass(frozen=True)
class Case:
    """One request and what the daemon must answer. For INVALID_ARGUMENT `names` must open the
    message ("field: ..."); for other codes it must appear somewhere in it."""

    rpc: str
    request: Message | bytes
    code: grpc.StatusCode
    names: str
    why: str

    def wire(self) -> bytes:
        if isinstance(self.request, bytes):
            return self.request
        return self.request.SerializeToString(deterministic=True)


def gen(why: str, names: str, code: grpc.StatusCode = INVALID, **fields: object) -> Case:
    fields.setdefault("prompt", "hi")
    fields.setdefault("max_tokens", 2)
    return Case("Generate", pb.GenerateRequest(**fields), code, names, why)


def msgs(*turns: tuple[str, str]) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role=r, content=c) for r, c in turns]


BAD: list[Case] = [
    # max_tokens
    gen("max_tokens zero", "max_tokens", max_tokens=0),
    gen("max_tokens negative", "max_tokens", max_tokens=-1),
    gen("max_tokens one past the cap", "max_tokens", max_tokens=CAP + 1),
    gen("max_tokens int32 max", "max_tokens", max_tokens=INT32_MAX),
    gen("max_tokens int32 min", "max_tokens", max_tokens=INT32_MIN),
    # temperature
    gen("temperature negative", "temperature", temperature=-0.1),
    gen("temperature just above 2", "temperature", temperature=2.001),
    gen("temperature huge", "temperature", temperature=1e30),
    gen("temperature NaN", "temperature", temperature=float("nan")),
    gen("temperature +inf", "temperature", temperature=float("inf")),
    gen("temperature -inf", "temperature", temperature=float("-inf")),
    # top_p
    gen("top_p zero", "top_p", top_p=0.0),
    gen("top_p negative", "top_p", top_p=-0.5),
    gen("top_p above 1", "top_p", top_p=1.001),
    gen("top_p NaN", "top_p", top_p=float("nan")),
    gen("top_p inf", "top_p", top_p=float("inf")),
    # top_k, seed
    gen("top_k negative", "top_k", top_k=-1),
    gen("top_k int32 min", "top_k", top_k=INT32_MIN),
    gen("seed negative", "seed", seed=-1),
    gen("seed int64 min", "seed", seed=INT64_MIN),
    # draft_tokens
    gen("draft_tokens 17", "draft_tokens", draft_tokens=17),
    gen("draft_tokens negative", "draft_tokens", draft_tokens=-1),
    gen("draft_tokens int32 max", "draft_tokens", draft_tokens=INT32_MAX),
    # mode: unknown enum numbers (proto3 enums are open, so these arrive as numbers)
    gen("mode 3", "mode", mode=3),
    gen("mode -1", "mode", mode=-1),
    gen("mode int32 max", "mode", mode=INT32_MAX),
    # prompt and messages
    gen("empty prompt, no messages", "prompt", prompt=""),
    gen("empty raw prompt", "prompt", prompt="", raw=True),
    gen("prompt one token past max_prompt_tokens", "prompt", prompt=Q * (MAX_PROMPT + 1), raw=True),
    gen("chat prompt far past max_prompt_tokens", "prompt", prompt=Q * 3000),
    gen(
        "prompt plus max_tokens past the context",
        "max_tokens",
        prompt=Q * (CONTEXT - CAP + 1),
        raw=True,
        max_tokens=CAP,
    ),
    gen("prompt and messages both", "prompt", messages=msgs(("user", "y"))),
    gen("raw with messages", "raw", prompt="", raw=True, messages=msgs(("user", "y"))),
    gen("unknown role", "messages[0].role", prompt="", messages=msgs(("wizard", "x"))),
    gen("empty role", "messages[0].role", prompt="", messages=msgs(("", "x"))),
    gen(
        "role in the wrong case",
        "messages[1].role",
        prompt="",
        messages=msgs(("user", "a"), ("User", "b")),
    ),
    gen("only system messages", "messages", prompt="", messages=msgs(("system", "be brief"))),
    gen(
        "messages longer than max_prompt_tokens",
        "messages",
        prompt="",
        messages=msgs(*[("user", Q * 110)] * 20),
    ),
    # stop strings
    gen("stop string empty", "stop[0]", stop=[""]),
    gen("second stop string empty", "stop[1]", stop=["ok", ""]),
    gen("stop string one past 256 chars", "stop[0]", stop=["x" * 257]),
    gen("stop string huge", "stop[0]", stop=["y" * 20_000]),
    gen("17 stop strings", "stop", stop=[f"s{i}" for i in range(17)]),
    # structured output (issue 22): checked and compiled before anything is queued
    gen("json_schema not JSON", "json_schema", json_schema="{nope"),
    gen("json_schema of an unknown type", "json_schema", json_schema='{"type": "bogus"}'),
    gen("json_schema an array", "json_schema", json_schema="[1]"),
    gen("regex unbalanced", "regex", regex="a(b"),
    gen("regex empty", "regex", regex=""),
    gen("lark rule undefined", "lark", lark="start: nothing"),
    gen("json_object in fast mode", "mode", json_object=True, mode=pb.MODE_FAST),
    # the whole message past server.max_message_bytes: grpc's own limit, before any handler
    gen("request past max_message_bytes", "larger than max", EXHAUSTED, prompt="z" * MAX_MESSAGE),
    # Train
    Case("Train", pb.TrainRequest(steps=0), INVALID, "steps", "steps zero"),
    Case("Train", pb.TrainRequest(steps=-1), INVALID, "steps", "steps negative"),
    Case("Train", pb.TrainRequest(steps=100_001), INVALID, "steps", "steps past 100000"),
    Case("Train", pb.TrainRequest(steps=INT32_MAX), INVALID, "steps", "steps absurd"),
    Case("Train", pb.TrainRequest(max_cases=1), INVALID, "max_cases", "max_cases one"),
    Case("Train", pb.TrainRequest(max_cases=-3), INVALID, "max_cases", "max_cases negative"),
    Case("Train", pb.TrainRequest(learning_rate=0.0), INVALID, "learning_rate", "lr zero"),
    Case("Train", pb.TrainRequest(learning_rate=-1e-3), INVALID, "learning_rate", "lr negative"),
    Case("Train", pb.TrainRequest(learning_rate=1.5), INVALID, "learning_rate", "lr above 1"),
    Case("Train", pb.TrainRequest(learning_rate=float("nan")), INVALID, "learning_rate", "lr NaN"),
    Case("Train", pb.TrainRequest(max_train_s=-1.0), INVALID, "max_train_s", "budget negative"),
    Case("Train", pb.TrainRequest(max_train_s=2e7), INVALID, "max_train_s", "budget past 1e7"),
    Case("Train", pb.TrainRequest(max_train_s=float("nan")), INVALID, "max_train_s", "budget NaN"),
    # Stats
    Case("Stats", pb.StatsRequest(watch=True, interval_s=0.0), INVALID, "interval_s", "zero"),
    Case("Stats", pb.StatsRequest(watch=True, interval_s=-1.0), INVALID, "interval_s", "negative"),
    Case("Stats", pb.StatsRequest(watch=True, interval_s=0.05), INVALID, "interval_s", "too fast"),
    Case("Stats", pb.StatsRequest(watch=True, interval_s=3601.0), INVALID, "interval_s", "slow"),
    Case("Stats", pb.StatsRequest(interval_s=float("nan")), INVALID, "interval_s", "NaN"),
    Case("Stats", pb.StatsRequest(interval_s=float("-inf")), INVALID, "interval_s", "-inf"),
    # ActivateAdapter: a version is a name in the adapters dir, never a path
    Case("ActivateAdapter", pb.ActivateAdapterRequest(), INVALID, "version", "empty version"),
    Case(
        "ActivateAdapter",
        pb.ActivateAdapterRequest(version="../v0001"),
        INVALID,
        "version",
        "relative path",
    ),
    Case(
        "ActivateAdapter",
        pb.ActivateAdapterRequest(version="/etc/passwd"),
        INVALID,
        "version",
        "absolute path",
    ),
    Case(
        "ActivateAdapter",
        pb.ActivateAdapterRequest(version="v0001/../../x"),
        INVALID,
        "version",
        "traversal after a valid name",
    ),
    Case(
        "ActivateAdapter",
        pb.ActivateAdapterRequest(version="v" * 65),
        INVALID,
        "version",
        "name past 64 chars",
    ),
    Case(
        "ActivateAdapter",
        pb.ActivateAdapterRequest(version="v0001\n"),
        INVALID,
        "version",
        "trailing newline",
    ),
    Case(
        "ActivateAdapter",
        pb.ActivateAdapterRequest(version=".tmp-x"),
        INVALID,
        "version",
        "hidden temp dir",
    ),
    Case(
        "ActivateAdapter",
        pb.ActivateAdapterRequest(version="v9999"),
        NOT_FOUND,
        "v9999",
        "version that does not exist",
    ),
    Case(
        "ActivateAdapter",
        pb.ActivateAdapterRequest(rollback=True),
        PRECONDITION,
        "nothing to roll back",
        "rollback with no history",
    ),
    Case("RollbackAdapter", pb.RollbackAdapterRequest(), PRECONDITION, "nothing", "no history"),
    Case("GetAdapter", pb.GetAdapterRequest(version="../v0001"), INVALID, "version", "a path"),
    Case("GetAdapter", pb.GetAdapterRequest(version="v0042"), NOT_FOUND, "v0042", "unknown"),
    Case("GetAdapter", pb.GetAdapterRequest(), PRECONDITION, "no adapter is active", "none"),
    # failure cases
    Case("GetFailureCase", pb.GetFailureCaseRequest(id=0), INVALID, "id", "id 0"),
    Case("GetFailureCase", pb.GetFailureCaseRequest(id=-3), INVALID, "id", "negative id"),
    Case("GetFailureCase", pb.GetFailureCaseRequest(id=424242), NOT_FOUND, "424242", "unknown"),
    Case("ListFailureCases", pb.ListFailureCasesRequest(limit=0), INVALID, "limit", "limit 0"),
    Case("ListFailureCases", pb.ListFailureCasesRequest(limit=1001), INVALID, "limit", "too many"),
    Case("ListFailureCases", pb.ListFailureCasesRequest(before_id=0), INVALID, "before_id", "id 0"),
    # the caller's request id
    Case(
        "Generate",
        pb.GenerateRequest(prompt="hi", request_id="has spaces"),
        INVALID,
        "request_id",
        "request id with spaces",
    ),
    Case(
        "Generate",
        pb.GenerateRequest(prompt="hi", request_id="x" * 65),
        INVALID,
        "request_id",
        "request id too long",
    ),
    # bytes that are not the request message at all
    Case("Generate", b"\xff\xff\xff", INVALID, "request", "garbage bytes"),
    Case("Train", b"\x0a\x05ab", INVALID, "request", "truncated message"),
    Case("ActivateAdapter", b"\x0a\x02\xff\xfe", INVALID, "request", "invalid UTF-8 string"),
]

# Exactly at the limits: all served (Train has no failure cases yet: the documented precondition).
AT_LIMITS: list[Case] = [
    gen("max_tokens 1", "", OK, max_tokens=1),
    gen("max_tokens at the cap", "", OK, max_tokens=CAP, prompt="Hello"),
    gen("temperature 0", "", OK, temperature=0.0),
    gen("temperature 2", "", OK, temperature=2.0, seed=1),
    gen("top_p 1", "", OK, top_p=1.0, temperature=1.0),
    gen("top_p tiny", "", OK, top_p=1e-6, temperature=1.0),
    gen("top_k int32 max", "", OK, top_k=INT32_MAX, temperature=1.0),
    gen("seed 0", "", OK, seed=0, temperature=1.0),
    gen("seed int64 max", "", OK, seed=INT64_MAX, temperature=1.0),
    gen("draft_tokens 0", "", OK, draft_tokens=0),
    gen("draft_tokens 16", "", OK, draft_tokens=16),
    gen("16 stop strings of 256 chars", "", OK, stop=[f"{i:03d}" + "q" * 253 for i in range(16)]),
    gen("fast mode", "", OK, mode=pb.MODE_FAST),
    gen("assistant turn continued", "", OK, prompt="", messages=msgs(("assistant", "Once"))),
    gen("whitespace prompt", "", OK, prompt="   "),
    gen("NUL in the prompt", "", OK, prompt="a\x00b"),
    gen(
        "prompt at max_prompt_tokens, filling the context",
        "",
        OK,
        prompt=Q * MAX_PROMPT,
        raw=True,
        max_tokens=CONTEXT - MAX_PROMPT,
    ),
    Case("Stats", pb.StatsRequest(interval_s=0.1), OK, "", "interval 0.1"),
    Case("Stats", pb.StatsRequest(interval_s=3600.0), OK, "", "interval 3600"),
    Case("Train", pb.TrainRequest(steps=100_000), PRECONDITION, "failure cases", "steps at max"),
    Case("Train", pb.TrainRequest(max_cases=2, learning_rate=1.0), PRECONDITION, "cases", "lr 1"),
    Case("ActivateAdapter", pb.ActivateAdapterRequest(version="none"), OK, "", "base draft"),
]


@pytest.fixture(scope="module")
def daemon(
    tiny_paths: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalDaemon]:
    d = local_daemon(
        tmp_path_factory.mktemp("bad-input"),
        {
            "models": {"target": str(tiny_paths[0]), "draft": str(tiny_paths[1])},
            "generation": {"max_tokens": 8, "max_tokens_cap": CAP, "max_prompt_tokens": MAX_PROMPT},
            "server": {"max_message_bytes": MAX_MESSAGE},
            # Nothing is recorded, so Train always stops at its documented precondition.
            "learning": {"record": False},
        },
    )
    yield d
    d.close()


def call(daemon: LocalDaemon, case: Case) -> tuple[grpc.StatusCode, str]:
    """Send the case through the real server; (status code, details)."""
    if isinstance(case.request, bytes):
        method = daemon.raw_stream(case.rpc)
    else:
        method = getattr(daemon.stub, case.rpc)
    try:
        reply = method(case.request, timeout=60)
        streaming = isinstance(case.request, bytes) or METHODS[case.rpc].server_streaming
        replies = list(reply) if streaming else [reply]
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    assert replies, f"{case.why}: an OK stream with no reply"
    return OK, ""


def mismatch(case: Case, code: grpc.StatusCode, details: str) -> str | None:
    named = details.startswith(f"{case.names}:") if code == INVALID else case.names in details
    if code == case.code and named:
        return None
    got = f"{code.name} {details[:160]!r}"
    return f"{case.rpc} {case.why}: got {got}, want {case.code.name} {case.names!r}"


def test_cases_are_distinct() -> None:
    keys = {(case.rpc, case.wire()) for case in BAD}
    assert len(keys) == len(BAD) >= 30


def test_every_bad_request_is_refused_naming_its_field(daemon: LocalDaemon) -> None:
    problems = []
    codes: Counter[str] = Counter()
    for case in BAD:
        code, details = call(daemon, case)
        codes[code.name] += 1
        problem = mismatch(case, code, details)
        if problem:
            problems.append(problem)
    assert not problems, "\n".join(problems)
    # The daemon is unharmed: still SERVING, idle, and answering.
    assert daemon.health() == SERVING
    assert daemon.worker.alive and daemon.worker.active_count == 0
    events = list(daemon.stub.Generate(pb.GenerateRequest(prompt="hi", max_tokens=3), timeout=30))
    assert events[-1].HasField("summary")
    per_rpc = Counter(c.rpc for c in BAD)
    print(f"\nbad inputs tried: {len(BAD)} ({dict(per_rpc)}), answered {dict(codes)}")


def test_requests_at_the_limits_are_served(daemon: LocalDaemon) -> None:
    problems = [
        problem
        for case in AT_LIMITS
        if (problem := mismatch(case, *call(daemon, case))) is not None
    ]
    assert not problems, "\n".join(problems)
    assert daemon.health() == SERVING
    print(f"\nat-limit requests served: {len(AT_LIMITS)}")
