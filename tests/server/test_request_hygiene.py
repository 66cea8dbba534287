"""What a request may make the server do with what it sent: two `authorization` headers
are refused, and an id of any length is echoed capped, in the status and in the logs."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from memsvc.obs.capping import ID_LIMIT, MESSAGE_LIMIT, capped
from memsvc.proto.v1 import memsvc_pb2 as pb
from memsvc.proto.v1 import memsvc_pb2_grpc as pb_grpc
from memsvc.server.backends import open_database
from memsvc.server.process import ServerProcess
from tests.server.harness import ADMIN_KEY, Service, create_tenant

HUGE_ID = "x" * (1 << 20)  # 1 MB


def test_capped_keeps_short_text_and_says_how_much_was_cut() -> None:
    assert capped("a" * ID_LIMIT) == "a" * ID_LIMIT
    long = capped("b" * (ID_LIMIT + 10))
    assert long.startswith("b" * ID_LIMIT) and long.endswith("...[10 more characters]")


def test_two_authorization_headers_are_unauthenticated(service: Service) -> None:
    key = ("authorization", f"Bearer {service.alice.api_key}")
    stub = service.stub
    assert stub.ListSessions(pb.ListSessionsRequest(), metadata=(key,)).sessions == []
    for second in (key, ("authorization", "Bearer someone-else")):
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListSessions(pb.ListSessionsRequest(), metadata=(key, second))
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "exactly one" in refused.value.details()
    admin = ("authorization", f"Bearer {ADMIN_KEY}")
    with pytest.raises(grpc.RpcError) as refused:
        service.admin.ListResident(pb.ListResidentRequest(), metadata=(admin, admin))
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_a_huge_session_id_is_capped_in_statuses_and_logs(tmp_path: Path, model_dir: Path) -> None:
    data_dir = tmp_path / "data"
    database = open_database(data_dir, None)
    tenant = create_tenant(database, "hygiene")
    database.dispose()
    log_path = tmp_path / "server.log"
    server = ServerProcess(
        ["--data-dir", str(data_dir), "--model", str(model_dir)],
        log_path,
        env={"MEMSVC_ADMIN_KEY": ADMIN_KEY},
    )
    options = [("grpc.max_send_message_length", 8 << 20)]
    with server:
        server.start()
        with grpc.insecure_channel(server.address, options=options) as channel:
            stub = pb_grpc.MemoryServiceStub(channel)
            admin = pb_grpc.AdminServiceStub(channel)
            calls = [
                lambda: stub.GetSession(
                    pb.GetSessionRequest(session_id=HUGE_ID), metadata=tenant.metadata
                ),
                lambda: stub.Checkpoint(
                    pb.CheckpointRequest(session_id=HUGE_ID), metadata=tenant.metadata
                ),
                lambda: admin.EvictSession(
                    pb.EvictSessionRequest(session_id=HUGE_ID, tier=pb.TIER_DISK),
                    metadata=(("authorization", f"Bearer {ADMIN_KEY}"),),
                ),
            ]
            for call in calls:
                with pytest.raises(grpc.RpcError) as refused:
                    call()
                assert refused.value.code() is grpc.StatusCode.NOT_FOUND
                assert len(refused.value.details()) <= MESSAGE_LIMIT + 64
                assert "more characters" in refused.value.details()
        server.stop()
    lines = log_path.read_text().splitlines()
    refusals = [json.loads(line) for line in lines if '"rpc_refused"' in line]
    assert len(refusals) == len(calls)
    assert max(len(line) for line in lines) < 3 * MESSAGE_LIMIT
