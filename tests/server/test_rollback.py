"""Rollback through the real gRPC server: an induced explosion (infinite memory weights in a
session's state in memory) makes that session's Append, Query and Generate fail with
FAILED_PRECONDITION and a clear message; the session keeps every acknowledged token and
takes appends again; a concurrent append to another session succeeds; each rollback is a
"rollback" event (ListEvents) and counts in memsvc_state_rollbacks_total (the alert's metric)."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import grpc
import pytest

from memsvc.engine import StreamingEngine
from memsvc.obs.metrics import ServiceMetrics
from memsvc.proto.v1 import memsvc_pb2 as pb
from tests.server.harness import ADMIN_KEY, start_service, stop_service
from tests.sessions.helpers import poison

TEXT = bytes(range(32, 127)) * 3  # long enough to write the memory
ADMIN = (("authorization", f"Bearer {ADMIN_KEY}"),)


def test_an_explosion_is_refused_rolled_back_and_counted(
    tmp_path: Path, engine: StreamingEngine
) -> None:
    metrics = ServiceMetrics()
    service = start_service(tmp_path / "data", engine, metrics=metrics)
    alice = service.alice.metadata
    tenant = service.alice.tenant_id
    stub = service.stub
    try:
        bad, good = (
            stub.CreateSession(pb.CreateSessionRequest(name=n), metadata=alice).session_id
            for n in ("bad", "good")
        )

        def append(session: str, text: bytes = TEXT) -> pb.AppendAck:
            request = pb.AppendRequest(session_id=session, input=pb.Input(text=text))
            return stub.Append(request, metadata=alice)

        acknowledged = append(bad).position
        append(good)
        poison(service.manager, tenant, bad)

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            refused, other = pool.submit(append, bad), pool.submit(append, good)
            assert other.result().position == 2 * len(TEXT)
            with pytest.raises(grpc.RpcError) as caught:
                refused.result()
        assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "non-finite" in caught.value.details()
        assert f"rolled back to its last finite state at position {acknowledged}" in (
            caught.value.details()
        )

        prompt = pb.Prompt(
            input=pb.Input(text=TEXT), params=pb.SamplingParams(max_new_tokens=4, temperature=0)
        )
        poison(service.manager, tenant, bad)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Query(pb.QueryRequest(session_id=bad, prompt=prompt), metadata=alice)
        assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        poison(service.manager, tenant, bad)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(pb.GenerateRequest(session_id=bad, prompt=prompt), metadata=alice))
        assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION

        session = stub.GetSession(pb.GetSessionRequest(session_id=bad), metadata=alice)
        assert session.position == acknowledged
        assert append(bad, b"and on").position == acknowledged + len(b"and on")
        events = service.admin.ListEvents(
            pb.ListEventsRequest(tenant_id=tenant, kind="rollback"), metadata=ADMIN
        ).events
        assert sorted(e.session_id for e in events) == [bad] * 3
        assert metrics.registry.get_sample_value("memsvc_state_rollbacks_total") == 3
    finally:
        stop_service(service)
