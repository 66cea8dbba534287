"""Operations on a real server over loopback: /metrics moves with the stream, a hostile
stream trips its session's guard (mitigated, recorded, visible to the operator), and the
recall canary runs and cleans up after itself."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch

from memsvc.engine import StreamingEngine
from memsvc.memory import MemoryConfig
from memsvc.model.io import save_model
from memsvc.model.model import MAGModel
from memsvc.obs.guard import GuardConfig
from memsvc.obs.metrics import ServiceMetrics
from memsvc.proto.v1 import memsvc_pb2 as pb
from memsvc.server.app import ServerConfig
from memsvc.server.backends import load_engine
from memsvc.server.canary import CANARY_TENANT
from memsvc.server.process import free_port
from memsvc.store import metadata
from memsvc.store.models import EventKind
from memsvc.train.recipe import model_config
from tests.obs.test_metrics import scrape, value
from tests.server.harness import (
    ADMIN_KEY,
    MAX_MESSAGE_BYTES,
    Service,
    start_service,
    stop_service,
)

ADMIN = (("authorization", f"Bearer {ADMIN_KEY}"),)
APPEND = "/memsvc.v1.MemoryService/Append"

# The memory of tests/obs/test_guard_memory.py that diverges on random bytes: a step size far
# above the stable one and no cap on a chunk's update (its norm grows ~100x per 64 tokens).
HOSTILE_MEMORY = MemoryConfig(
    dim=32, heads=1, depth=2, chunk_size=16, update_rule="chunk", max_step=5.0,
    max_update_norm=None,
)  # fmt: skip
# The input band is off (no entropy reaches 16 bits): this stream is about the norm.
HOSTILE_GUARD = GuardConfig(
    norm_bound=1e12, window_tokens=64, recovery_tokens=1 << 20, max_input_entropy=16.0
)


def server_config(**more: object) -> ServerConfig:
    return ServerConfig(
        address="127.0.0.1:0",
        admin_key=ADMIN_KEY,
        max_message_bytes=MAX_MESSAGE_BYTES,
        shutdown_grace_s=5.0,
        **more,
    )


def eventually(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Waits for what the server does after answering (the guards run after the ack)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def settle(service: Service) -> None:
    """Returns once the model thread has done everything queued (the guards run there after
    the acknowledgements)."""
    scheduler = service.thread.server.scheduler
    service.thread.run(scheduler.call(lambda: None))


def metrics_url(service: Service) -> str:
    return f"http://127.0.0.1:{service.thread.server.metrics_port}/metrics"


def test_metrics_move_with_the_stream(tmp_path: Path, engine: StreamingEngine) -> None:
    metrics = ServiceMetrics()
    config = server_config(metrics_port=free_port(), metrics_address="127.0.0.1")
    service = start_service(tmp_path / "data", engine, config, metrics=metrics)
    try:
        url = metrics_url(service)
        before = scrape(url)
        assert value(before, "memsvc_tokens_appended_total") == 0
        assert value(before, "memsvc_memory_norm_bound") > 0  # infinite for this random model
        alice = service.alice.metadata
        session = service.stub.CreateSession(pb.CreateSessionRequest(), metadata=alice)
        requests = [
            pb.StreamRequest(request_id=1, open=pb.OpenStream(session_id=session.session_id))
        ]
        requests += [
            pb.StreamRequest(request_id=2 + i, append=pb.Input(text=b"y" * 100)) for i in range(3)
        ]
        responses = list(service.stub.Stream(iter(requests), metadata=alice))
        last = responses[-1].ack
        assert last.position == 300
        missing = pb.GetSessionRequest(session_id="no-such-session")
        with pytest.raises(grpc.RpcError) as refused:
            service.stub.GetSession(missing, metadata=alice)
        assert refused.value.code() is grpc.StatusCode.NOT_FOUND
        service.stub.Checkpoint(pb.CheckpointRequest(session_id=session.session_id), metadata=alice)
        evict = pb.EvictSessionRequest(session_id=session.session_id, tier=pb.TIER_DISK)
        service.admin.EvictSession(evict, metadata=ADMIN)
        append = pb.AppendRequest(session_id=session.session_id, input=pb.Input(text=b"z" * 20))
        assert service.stub.Append(append, metadata=alice).position == 320

        def settled() -> bool:
            samples = scrape(url)
            stream = ("memsvc_grpc_requests_total", "/memsvc.v1.MemoryService/Stream", "OK")
            return (
                value(samples, "memsvc_tokens_appended_total") == 320
                and (stream[0], frozenset({("method", stream[1]), ("code", stream[2])})) in samples
                and value(samples, "memsvc_sessions", tier="device") == 1
            )

        eventually(settled)
        after = scrape(url)
        rpcs = "memsvc_grpc_requests_total"
        assert value(after, rpcs, method="/memsvc.v1.MemoryService/CreateSession", code="OK") == 1
        assert value(after, rpcs, method="/memsvc.v1.MemoryService/Stream", code="OK") == 1
        assert value(after, rpcs, method=APPEND, code="OK") == 1
        get = "/memsvc.v1.MemoryService/GetSession"
        assert value(after, rpcs, method=get, code="NOT_FOUND") == 1
        assert value(after, "memsvc_grpc_request_seconds_count", method=APPEND) == 1
        # Four acknowledged appends; a fresh stream, so the per-append deltas sum to its totals.
        assert value(after, "memsvc_stream_chunk_seconds_count") == 4
        ack = service.stub.GetSession(
            pb.GetSessionRequest(session_id=session.session_id), metadata=alice
        )
        assert ack.position == 320
        applied = value(after, "memsvc_memory_writes_total", outcome="applied")
        skipped = value(after, "memsvc_memory_writes_total", outcome="skipped")
        assert applied + skipped == 2 * (320 // 16)  # two layers, 16-token chunks
        assert value(after, "memsvc_memory_chunks_total") == 320 // 16
        assert value(after, "memsvc_memory_norm_count") == 4
        # The manager's timings, through its observer.
        # One per log record: the stream's three appends, sent back to back, may share one.
        assert value(after, "memsvc_wal_fsync_seconds_count") >= 2
        assert value(after, "memsvc_checkpoint_seconds_count") >= 1
        assert value(after, "memsvc_eviction_seconds_count", tier="disk") == 1
        # The first touch of the new session, and the one after its eviction.
        assert value(after, "memsvc_restore_seconds_count", tier="disk") == 2
        assert not [name for name, _ in after if name == "memsvc_mitigations_total"]
    finally:
        stop_service(service)


@pytest.fixture(scope="module")
def hostile_engine(tmp_path_factory: pytest.TempPathFactory) -> StreamingEngine:
    torch.manual_seed(0)
    model = MAGModel(replace(model_config("tiny"), memory=HOSTILE_MEMORY)).eval()
    return load_engine(save_model(model, tmp_path_factory.mktemp("hostile-model")))


def test_a_hostile_stream_is_mitigated_recorded_and_shown(
    tmp_path: Path, hostile_engine: StreamingEngine
) -> None:
    metrics = ServiceMetrics()
    config = server_config(metrics_port=free_port(), metrics_address="127.0.0.1")
    service = start_service(
        tmp_path / "data", hostile_engine, config, metrics=metrics, guard_config=HOSTILE_GUARD
    )
    try:
        alice = service.alice.metadata
        session = service.stub.CreateSession(pb.CreateSessionRequest(), metadata=alice).session_id
        noise = torch.randint(0, 256, (512,), generator=torch.Generator().manual_seed(0))
        for piece in noise.split(64):
            request = pb.AppendRequest(session_id=session, input=pb.Input(token_ids=piece.tolist()))
            service.stub.Append(request, metadata=alice)

        def mitigations() -> list[pb.Event]:
            request = pb.ListEventsRequest(tenant_id=service.alice.tenant_id, kind="mitigation")
            return list(service.admin.ListEvents(request, metadata=ADMIN).events)

        settle(service)
        events = mitigations()
        first = events[-1]  # newest first
        assert (first.session_id, first.kind) == (session, "mitigation")
        assert first.payload["reason"] == "update_explosion"
        assert first.payload["step_scale"] == 0.5
        assert first.payload["evidence"]["norm_growth"] >= HOSTILE_GUARD.max_norm_growth
        # Recorded in SQL, and visible to the operator across tenants but not in another's.
        with service.database.unit_of_work() as db:
            rows = metadata.list_events(db, service.alice.tenant_id, kind=EventKind.MITIGATION)
            assert [row.id for row in rows] == [e.event_id for e in events]
            assert [row.session_id for row in rows] == [session] * len(rows)
        every = service.admin.ListEvents(pb.ListEventsRequest(kind="mitigation"), metadata=ADMIN)
        assert {e.event_id for e in every.events} == {row.id for row in rows}
        bobs = pb.ListEventsRequest(tenant_id=service.bob.tenant_id)
        assert not service.admin.ListEvents(bobs, metadata=ADMIN).events
        with pytest.raises(grpc.RpcError) as denied:
            service.admin.ListEvents(pb.ListEventsRequest(), metadata=alice)
        assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as bad:
            service.admin.ListEvents(pb.ListEventsRequest(kind="nonsense"), metadata=ADMIN)
        assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        # The resident session shows the knobs and its health.
        resident = service.admin.ListResident(pb.ListResidentRequest(), metadata=ADMIN)
        (shown,) = [s for s in resident.sessions if s.session_id == session]
        assert shown.step_scale == pytest.approx(rows[0].payload["step_scale"])
        assert shown.step_scale < 1.0
        assert shown.forget_boost == 0.0
        assert shown.HasField("memory_norm") and shown.HasField("updates_per_1k_tokens")
        # And in /metrics.
        samples = scrape(metrics_url(service))
        kinds = value(samples, "memsvc_mitigations_total", kind="update_explosion")
        assert kinds == len(rows)
        assert value(samples, "memsvc_checkpoint_seconds_count") >= len(rows)
    finally:
        stop_service(service)
    # The knobs are durable: a restarted server streams on under them.
    restarted = start_service(tmp_path / "data", hostile_engine, server_config())
    try:
        request = pb.AppendRequest(session_id=session, input=pb.Input(token_ids=[1, 2, 3]))
        restarted.stub.Append(request, metadata=alice)
        resident = restarted.admin.ListResident(pb.ListResidentRequest(), metadata=ADMIN)
        (shown,) = [s for s in resident.sessions if s.session_id == session]
        assert shown.step_scale == pytest.approx(rows[0].payload["step_scale"])
    finally:
        stop_service(restarted)


def test_the_recall_canary_runs_and_deletes_its_session(
    tmp_path: Path, engine: StreamingEngine
) -> None:
    metrics = ServiceMetrics()
    config = server_config(canary_interval_s=0.1)
    service = start_service(tmp_path / "data", engine, config, metrics=metrics)
    sample = metrics.registry.get_sample_value
    try:
        eventually(lambda: (sample("memsvc_canary_last_success_timestamp_seconds") or 0) > 0, 120)
        assert 0.0 <= sample("memsvc_canary_recall") <= 1.0
        assert sample("memsvc_canary_failures_total") == 0
        assert sample("memsvc_tokens_appended_total") > 0  # its appends go through the scheduler
        with service.database.unit_of_work() as db:
            tenant = metadata.find_tenant(db, CANARY_TENANT)
            assert tenant is not None

        def sessions() -> int:
            with service.database.unit_of_work() as db:
                return len(metadata.list_sessions(db, tenant.id))

        # One session at a time: each round's is deleted as the next round begins (for
        # an instant there is none).
        eventually(lambda: sessions() == 1, 30)
        assert sessions() <= 1
    finally:
        stop_service(service)
    with service.database.unit_of_work() as db:
        assert metadata.list_sessions(db, tenant.id) == []
