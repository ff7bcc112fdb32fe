"""The proto as a public contract, seen by clients that are not ours: a grpcurl-like client that
knows only what reflection tells it, structured error details, the caller's request id, and
the old streaming form of ActivateAdapter."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status
from helpers.daemons import LocalDaemon, local_daemon
from speclora.client.stub import InvalidRequest, NotFound, SpecLoRAClient
from speclora.daemon.learning.store import FailureCase
from speclora.daemon.server import SERVICE_NAME
from speclora.shared.pb import speclora_pb2 as pb
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs


@pytest.fixture(scope="module")
def daemon(
    tiny_target_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalDaemon]:
    d = local_daemon(
        tmp_path_factory.mktemp("contract"),
        {"models": {"target": str(tiny_target_path), "draft": "self:2"}},
    )
    d.runtime.learning.store.add_many(  # type: ignore[union-attr]
        [FailureCase((1, 2, i), (3, 4), proposed=2, accepted=0) for i in range(3)]
    )
    yield d
    d.close()


def test_a_reflection_client_lists_adapters_and_failure_cases(daemon: LocalDaemon) -> None:
    """What grpcurl does: learn the service from reflection alone, then call it."""
    database = ProtoReflectionDescriptorDatabase(daemon.channel)
    assert SERVICE_NAME in database.get_services()
    pool = descriptor_pool.DescriptorPool(database)
    service = pool.FindServiceByName(SERVICE_NAME)

    def call(method_name: str) -> object:
        method = service.FindMethodByName(method_name)
        request_cls = message_factory.GetMessageClass(method.input_type)
        reply_cls = message_factory.GetMessageClass(method.output_type)
        rpc = daemon.channel.unary_unary(
            f"/{SERVICE_NAME}/{method_name}",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=reply_cls.FromString,
        )
        return rpc(request_cls(), timeout=10)

    cases = call("ListFailureCases")
    assert cases.total == 3 and len(cases.cases) == 3  # type: ignore[attr-defined]
    adapters = call("ListAdapters")
    assert list(adapters.adapters) == []  # type: ignore[attr-defined]
    assert adapters.adapters_dir.endswith("adapters")  # type: ignore[attr-defined]
    # Every RPC and its comments-to-be are visible: the enums too.
    assert {m.name for m in service.methods} >= {
        "ListAdapters",
        "GetAdapter",
        "ActivateAdapter",
        "RollbackAdapter",
        "ListFailureCases",
        "GetFailureCase",
        "ExportFailureCases",
        "GetFailureStats",
        "PurgeFailureCases",
        "GetStats",
    }
    assert pool.FindEnumTypeByName("speclora.v1.AdapterStatus").values_by_name[
        "ADAPTER_STATUS_REJECTED"
    ]


def test_a_bad_field_is_named_in_the_status_details(daemon: LocalDaemon) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(daemon.stub.Generate(pb.GenerateRequest(prompt="hi", top_p=0.0), timeout=10))
    status = rpc_status.from_call(err.value)
    assert status is not None and status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert [v.field for v in bad.field_violations] == ["top_p"]
    assert "outside" in bad.field_violations[0].description
    with SpecLoRAClient(daemon.address) as client, pytest.raises(InvalidRequest) as caught:
        client.list_failure_cases(0)
    assert caught.value.field == "limit"


def test_unknown_names_are_not_found(daemon: LocalDaemon) -> None:
    for call in (
        lambda: daemon.stub.GetAdapter(pb.GetAdapterRequest(version="v0042"), timeout=10),
        lambda: daemon.stub.ActivateAdapter(pb.ActivateAdapterRequest(version="v0042"), timeout=10),
        lambda: daemon.stub.GetFailureCase(pb.GetFailureCaseRequest(id=4242), timeout=10),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with SpecLoRAClient(daemon.address) as client, pytest.raises(NotFound):
        client.get_failure_case(4242)


def test_the_callers_request_id_is_echoed_in_the_summary_and_the_log(daemon: LocalDaemon) -> None:
    with (
        capture_logs(processors=[merge_contextvars]) as logs,
        SpecLoRAClient(daemon.address) as client,
    ):
        events = list(client.generate("hi", max_tokens=3, request_id="my-tool:42"))
    assert events[-1].request_id == "my-tool:42"  # type: ignore[union-attr]
    mine = {e["event"] for e in logs if e.get("request_id") == "my-tool:42"}
    assert {"generation_queued", "generation_finished"} <= mine
    # Other RPCs take it from the x-request-id metadata.
    with capture_logs(processors=[merge_contextvars]) as logs:
        daemon.stub.GetStats(pb.GetStatsRequest(), metadata=(("x-request-id", "probe-7"),))
        with pytest.raises(grpc.RpcError):
            daemon.stub.GetFailureCase(
                pb.GetFailureCaseRequest(id=0), metadata=(("x-request-id", "probe-8"),)
            )
    assert any(e.get("request_id") == "probe-8" and e["event"] == "rpc_rejected" for e in logs)


def test_activate_adapter_answers_an_old_streaming_client(daemon: LocalDaemon) -> None:
    """ActivateAdapter became unary; a client built from the old proto (server-streaming, one
    message) reads the same bytes: one AdapterInfo, then OK."""
    old_style = daemon.channel.unary_stream(
        f"/{SERVICE_NAME}/ActivateAdapter",
        request_serializer=pb.ActivateAdapterRequest.SerializeToString,
        response_deserializer=pb.AdapterInfo.FromString,
    )
    replies = list(old_style(pb.ActivateAdapterRequest(version="none"), timeout=10))
    assert len(replies) == 1
    assert replies[0].status == pb.ADAPTER_STATUS_BASE and replies[0].status_name == "base"
