"""Access: who can reach the daemon and what a request can make it touch.

A real `speclora serve` (tiny models) started under umask 0 with loose pre-existing dirs and TCP
on 127.0.0.1: the socket, its dir and the private files still come out private; TCP without
the right token is UNAUTHENTICATED for every RPC, before the request is even parsed; a second
instance is refused while the first keeps streaming; a non-loopback bind is refused without
the explicit flag; and no request field can name a file.
"""

from __future__ import annotations

import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers.daemons import (
    Proc,
    daemon_env,
    local_config,
    log_events,
    run_cli,
    socket_path,
    start_daemon,
)
from speclora.client.stub import GenerationSummary, TextChunk
from speclora.daemon.server import SERVICE_NAME, ServerSetupError, create_server
from speclora.shared.paths import resolve_paths
from speclora.shared.pb import speclora_pb2 as pb
from speclora.shared.pb import speclora_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

METHODS = {m.name: m for m in pb.DESCRIPTOR.services_by_name["SpecLoRA"].methods}
# Every RPC, with a request that would succeed given the token.
REQUESTS = {name: getattr(pb, m.input_type.name)() for name, m in METHODS.items()} | {
    "Generate": pb.GenerateRequest(prompt="hi", max_tokens=2),
    "ActivateAdapter": pb.ActivateAdapterRequest(version="none"),
    "GetFailureCase": pb.GetFailureCaseRequest(id=1),
}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def daemon(tiny_target_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    home = tmp_path_factory.mktemp("access")
    env = daemon_env(home, tiny_target_path, SPECLORA_SERVER_TCP_ADDRESS="127.0.0.1:0")
    paths = resolve_paths(env)
    for loose in (paths.run_dir, paths.data_dir):  # left world-readable by someone before us
        loose.mkdir(parents=True)
        loose.chmod(0o755)
    log = home / "serve.log"
    proc = start_daemon(env, home, log, umask=0)
    yield Proc(proc, home, env, log)
    proc.terminate()
    assert proc.wait(30) == 0


def tcp_address(daemon: Proc) -> str:
    [ready] = log_events(daemon.log, "daemon_ready")
    assert ready["tcp"].startswith("127.0.0.1:")
    return ready["tcp"]


# ---------------------------------------------------------------------- file modes


def test_socket_dir_and_private_files_are_private_even_under_umask_0(daemon: Proc) -> None:
    paths = resolve_paths(daemon.env)
    sock = socket_path(daemon.home)
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert mode(sock) == 0o600
    assert mode(sock.parent) == 0o700
    assert mode(paths.lock_file) == 0o600
    assert mode(paths.data_dir) == 0o700
    assert mode(paths.token_file) == 0o600
    with daemon.client() as client:  # a recorded case makes sure the database files exist
        list(client.generate("hello", max_tokens=4, draft_tokens=2))
    databases = list(paths.data_dir.glob("failures.sqlite3*"))
    assert databases and all(mode(p) == 0o600 for p in databases), [
        (p.name, oct(mode(p))) for p in databases
    ]


# ---------------------------------------------------------------------- TCP and its token


WRONG_TOKENS = {
    "no metadata": (),
    "wrong token": (("authorization", "Bearer wrong"),),
    "empty bearer": (("authorization", "Bearer "),),
    "token without Bearer, truncated": (("authorization", "{token_prefix}"),),
    "right token plus a byte": (("authorization", "Bearer {token}x"),),
    "right token under another key": (("x-token", "Bearer {token}"),),
}


def test_tcp_without_the_right_token_is_unauthenticated_for_every_rpc(daemon: Proc) -> None:
    token = resolve_paths(daemon.env).token_file.read_text().strip()
    channel = grpc.insecure_channel(tcp_address(daemon))
    stub = pb_grpc.SpecLoRAStub(channel)
    tried = 0
    for label, metadata in WRONG_TOKENS.items():
        metadata = tuple((k, v.format(token=token, token_prefix=token[:-1])) for k, v in metadata)
        for method, request in REQUESTS.items():
            with pytest.raises(grpc.RpcError) as err:
                reply = getattr(stub, method)(request, metadata=metadata, timeout=10)
                if METHODS[method].server_streaming:
                    list(reply)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (label, method)
            tried += 1
        # Garbage bytes learn nothing either: authentication comes before parsing.
        raw = channel.unary_stream(f"/{SERVICE_NAME}/Generate")
        with pytest.raises(grpc.RpcError) as err:
            list(raw(b"\xff\xff\xff", metadata=metadata, timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, label
        # Reflection would describe the service: also behind the token.
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(
                reflect.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                    metadata=metadata,
                    timeout=10,
                )
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, label
        tried += 2
    # The right token works, and health stays open for supervisors.
    good = (("authorization", f"Bearer {token}"),)
    events = list(stub.Generate(REQUESTS["Generate"], metadata=good, timeout=30))
    assert events[-1].HasField("summary")
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
    channel.close()
    print(f"\nTCP: {tried} calls without the right token, all UNAUTHENTICATED")


def test_non_loopback_tcp_is_refused_before_anything_listens(tmp_path: Path) -> None:
    for address in ("0.0.0.0:0", "[::]:0", "192.168.1.10:0", "10.0.0.1:0", "example.com:0"):
        config, paths = local_config(tmp_path / "home", {"server": {"tcp_address": address}})
        with pytest.raises(ServerSetupError, match="allow_non_loopback"):
            create_server(config, worker=None, paths=paths)  # type: ignore[arg-type]
        assert not paths.socket_path.exists()


def test_serve_refuses_a_non_loopback_address_without_the_flag(
    tiny_target_path: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    env = daemon_env(home, tiny_target_path, SPECLORA_SERVER_TCP_ADDRESS="0.0.0.0:0")
    result = run_cli(env, "serve", timeout=120)
    assert result.returncode != 0
    assert "not a loopback address" in result.stderr and "allow_non_loopback" in result.stderr
    assert "Traceback" not in result.stderr
    assert "model_loaded" not in result.stderr  # refused before minutes of loading
    assert not socket_path(home).exists()


# ---------------------------------------------------------------------- single instance


def test_second_instance_is_refused_without_disturbing_the_first(
    daemon: Proc, tmp_path: Path
) -> None:
    sock = socket_path(daemon.home)
    inode = sock.stat().st_ino
    events: list[object] = []
    first_chunk = threading.Event()

    def stream() -> None:
        with daemon.client() as client:
            for event in client.generate("Explain quantum computing simply.", max_tokens=2000):
                events.append(event)
                first_chunk.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first_chunk.wait(30)
    # Same state dir, even with another socket path: the lock is per installation.
    for extra in ({}, {"SPECLORA_SERVER_SOCKET_PATH": str(tmp_path / "other.sock")}):
        second = run_cli({**daemon.env, **extra}, "serve", timeout=60)
        assert second.returncode != 0
        assert f"already running (pid {daemon.proc.pid})" in second.stderr
        assert "Traceback" not in second.stderr
    still_streaming = reader.is_alive()
    reader.join(60)
    assert isinstance(events[-1], GenerationSummary), "the first daemon's stream was disturbed"
    assert sum(len(e.token_ids) for e in events if isinstance(e, TextChunk)) == (
        events[-1].completion_tokens
    )
    assert sock.stat().st_ino == inode and daemon.proc.poll() is None
    assert not (tmp_path / "other.sock").exists()
    with daemon.client() as client:
        assert client.health() == "SERVING"
    state = "still streaming" if still_streaming else "already finished"
    print(
        f"\nsecond instance refused twice; the first's stream was {state} then and ended "
        f"with a summary of {events[-1].completion_tokens} tokens"
    )


# ---------------------------------------------------------------------- requests name no files


ALLOWED_STRINGS = {
    "speclora.v1.GenerateRequest.prompt",  # text for the model
    "speclora.v1.GenerateRequest.stop",
    "speclora.v1.ChatMessage.role",
    "speclora.v1.ChatMessage.content",
    "speclora.v1.ActivateAdapterRequest.version",  # a name, checked against [A-Za-z0-9._-]
    "speclora.v1.GetAdapterRequest.version",  # the same check
    "speclora.v1.GenerateRequest.request_id",  # an id for logs, checked against [A-Za-z0-9._:-]
    # Structured output: compiled by llguidance in memory, never opened as files.
    "speclora.v1.GenerateRequest.json_schema",
    "speclora.v1.GenerateRequest.regex",
    "speclora.v1.GenerateRequest.lark",
}


def test_no_request_field_can_name_a_path() -> None:
    """Every string a client can send, in every request message of every RPC. A new one
    (an adapter_path, a model dir) fails here until someone has decided it is safe."""
    service = pb.DESCRIPTOR.services_by_name["SpecLoRA"]
    strings: set[str] = set()

    def walk(message: object, seen: set[str]) -> None:
        if message.full_name in seen:  # type: ignore[attr-defined]
            return
        seen.add(message.full_name)  # type: ignore[attr-defined]
        for f in message.fields:  # type: ignore[attr-defined]
            if f.type == FieldDescriptor.TYPE_STRING or f.type == FieldDescriptor.TYPE_BYTES:
                strings.add(f.full_name)
            elif f.message_type is not None:
                walk(f.message_type, seen)

    for method in service.methods:
        walk(method.input_type, set())
    assert strings == ALLOWED_STRINGS
    for name in strings:
        assert not any(word in name.lower() for word in ("path", "dir", "file", "model"))


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def test_a_path_smuggled_in_an_unknown_field_is_ignored(daemon: Proc, tmp_path: Path) -> None:
    evil = tmp_path / "evil-adapter"
    evil.mkdir()
    payload = pb.GenerateRequest(prompt="hi", max_tokens=2).SerializeToString()
    path = str(evil).encode()
    for number in (13, 100, 536870911):  # the next free field number, a middling one, the max
        payload += varint(number << 3 | 2) + varint(len(path)) + path  # length-delimited
    channel = grpc.insecure_channel(f"unix:{socket_path(daemon.home)}")
    raw = channel.unary_stream(
        f"/{SERVICE_NAME}/Generate", request_serializer=None, response_deserializer=None
    )
    replies = [pb.GenerateEvent.FromString(r) for r in raw(payload, timeout=30)]
    channel.close()
    assert replies[-1].summary.adapter_version == ""
    with daemon.client() as client:
        assert client.stats().adapter_version == ""
    assert list(evil.iterdir()) == []
