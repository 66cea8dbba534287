"""The server around the servicers: health, reflection, the stream's ops, batching, TLS,
and the graceful stop."""

from __future__ import annotations

import gc
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from memsvc.client import MemoryClient, RetryPolicy
from memsvc.client.errors import UnavailableError
from memsvc.client.retry import NO_RETRY
from memsvc.engine import StreamingEngine
from memsvc.proto.v1 import memsvc_pb2 as pb
from memsvc.server.app import ServerConfig
from memsvc.sessions.manager import SessionManager
from tests.server.harness import Service, start_service, stop_service

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_and_reflection(service: Service) -> None:
    health = health_pb2_grpc.HealthStub(service.channel)
    for name in ("", "memsvc.v1.MemoryService", "memsvc.v1.AdminService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(service.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (answer,) = reflection.ServerReflectionInfo(iter([request]))
    names = {s.name for s in answer.list_services_response.service}
    assert {"memsvc.v1.MemoryService", "memsvc.v1.AdminService", "grpc.health.v1.Health"} <= names


def test_one_stream_appends_queries_and_generates(service: Service) -> None:
    session = service.stub.CreateSession(pb.CreateSessionRequest(), metadata=service.alice.metadata)
    prompt = pb.Prompt(
        input=pb.Input(text=b"Q"),
        params=pb.SamplingParams(max_new_tokens=4, allow_eos=False, temperature=0),
    )
    requests = [
        pb.StreamRequest(request_id=7, open=pb.OpenStream(session_id=session.session_id)),
        pb.StreamRequest(request_id=8, append=pb.Input(text=b"hello")),
        pb.StreamRequest(request_id=9, query=prompt),
        pb.StreamRequest(request_id=10, generate=prompt),
        pb.StreamRequest(request_id=11, append=pb.Input(token_ids=[1, 2])),
    ]
    responses = list(service.stub.Stream(iter(requests), metadata=service.alice.metadata))
    # The generation's tokens come in one or more messages (a message per hand-over of
    # up to 16 tokens), then the closing one.
    n_generated = len(responses) - 4
    assert [(r.request_id, r.WhichOneof("result")) for r in responses] == [
        (7, "opened"),
        (8, "ack"),
        (9, "answer"),
        *[(10, "generated")] * n_generated,
        (11, "ack"),
    ]
    assert responses[0].opened.session_id == session.session_id
    assert responses[1].ack.position == 5
    assert len(responses[2].answer.token_ids) == 4
    generated = [r.generated for r in responses[3 : 3 + n_generated]]
    assert 2 <= n_generated <= 5
    assert all(g.token_ids and not g.done for g in generated[:-1])
    assert sum(len(g.token_ids) for g in generated) == 4
    assert not generated[-1].token_ids
    assert generated[-1].done and generated[-1].finish_reason == "length"
    assert responses[-1].ack.position == 5 + 1 + 4 + 2  # the query left no trace


class RecordingManager(SessionManager):
    """The real manager, noting how many appends each engine step was given."""

    batches: list[int]

    def append_many(self, items, durable=None):
        self.batches.append(len(items))
        return super().append_many(items, durable)


def test_appends_waiting_together_share_one_step(tmp_path: Path, engine: StreamingEngine) -> None:
    service = start_service(tmp_path / "data", engine, manager_class=RecordingManager)
    service.manager.batches = []
    try:
        sessions = [
            service.stub.CreateSession(pb.CreateSessionRequest(), metadata=service.alice.metadata)
            for _ in range(8)
        ]
        scheduler = service.thread.server.scheduler
        busy = service.thread.submit(scheduler.call(time.sleep, 1.0))  # appends pile up meanwhile

        def append(session: pb.Session) -> pb.AppendAck:
            request = pb.AppendRequest(
                session_id=session.session_id, input=pb.Input(text=b"x" * 40)
            )
            return service.stub.Append(request, metadata=service.alice.metadata)

        with ThreadPoolExecutor(8) as pool:
            acks = list(pool.map(append, sessions))
        busy.result(10)
        assert [a.position for a in acks] == [40] * 8
        assert service.manager.batches == [8]
    finally:
        stop_service(service)


def test_stop_goes_not_serving_and_ends_idle_streams(
    tmp_path: Path, engine: StreamingEngine
) -> None:
    service = start_service(tmp_path / "data", engine)
    health = health_pb2_grpc.HealthStub(service.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service="memsvc.v1.MemoryService"))
    assert next(watch).status == SERVING
    # No retries: the stream's end is the point (a cluster's client resumes elsewhere).
    with MemoryClient(service.address, service.alice.api_key, retry=NO_RETRY) as client:
        session = client.create_session()
        pieces = iter([[65] * 10])
        idle = threading.Event()

        def feed():
            yield from pieces
            idle.wait()  # the stream waits for its client until the server stops

        stream = session.append_stream(feed())
        assert next(stream).position == 10
        stopper = threading.Thread(target=service.thread.stop)
        started = time.monotonic()
        stopper.start()
        assert next(watch).status == NOT_SERVING
        watch.cancel()  # a watch is a call in flight: it would hold the stop for the grace
        with pytest.raises(UnavailableError, match="shutting down"):
            next(stream)
        idle.set()
        stopper.join(30)
    assert time.monotonic() - started < service.thread.server.config.shutdown_grace_s
    service.channel.close()
    # The manager checkpointed the session as it closed.
    reopened = start_service(tmp_path / "data", engine)
    try:
        get = pb.GetSessionRequest(session_id=session.id)
        info = reopened.stub.GetSession(get, metadata=service.alice.metadata)
        assert info.position == info.durable_position == 10
    finally:
        stop_service(reopened)
        service.database.dispose()


def test_tls(tmp_path: Path, engine: StreamingEngine) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subject = ["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
    files = ["-keyout", str(key), "-out", str(cert)]
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    subprocess.run([*command, *subject, *files], check=True, capture_output=True)
    config = ServerConfig(address="127.0.0.1:0", tls_cert=cert, tls_key=key)
    service = start_service(tmp_path / "data", engine, config)
    try:
        with MemoryClient(
            service.address, service.alice.api_key, root_certificates=cert.read_bytes()
        ) as client:
            assert client.create_session("tls").append("secret").position == 6
        plain = MemoryClient(service.address, service.alice.api_key, retry=RetryPolicy(attempts=1))
        with plain, pytest.raises(UnavailableError):
            plain.list_sessions()
    finally:
        stop_service(service)


def test_a_running_server_keeps_its_startup_objects_out_of_full_collections(
    service: Service,
) -> None:
    # A generation-2 collection over everything loaded at startup stopped every thread
    # for 110-130 ms, the p99 of every append in flight (docs/BENCHMARKS.md); frozen, the
    # objects stay alive and the collector skips them.
    assert gc.get_freeze_count() > 10_000
    session = service.stub.CreateSession(pb.CreateSessionRequest(), metadata=service.alice.metadata)
    gc.collect()
    ack = service.stub.Append(
        pb.AppendRequest(session_id=session.session_id, input=pb.Input(text=b"still serving")),
        metadata=service.alice.metadata,
    )
    assert ack.position == len(b"still serving")
