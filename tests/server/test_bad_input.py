"""Bad requests over real gRPC: each gets its precise status code and changes nothing.

Every case runs against one server holding a session of alice's with some
tokens in it; after each, that session's state (the checksum of its export:
every weight and counter), every tenant's session list and the server's append
counters are exactly as before.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from memsvc.engine import StreamingEngine
from memsvc.proto.v1 import memsvc_pb2 as pb
from memsvc.sessions.checkpoint import decode_checkpoint
from tests.server.harness import (
    ADMIN_KEY,
    MAX_MESSAGE_BYTES,
    MAX_TOKENS_PER_REQUEST,
    Service,
    create_tenant,
    start_service,
    stop_service,
)

Code = grpc.StatusCode


@dataclass(frozen=True)
class World:
    service: Service
    session_id: str  # alice's

    def append(self, metadata: tuple = (), session_id: str | None = None, **input_fields):
        request = pb.AppendRequest(
            session_id=session_id or self.session_id, input=pb.Input(**input_fields)
        )
        return self.service.stub.Append(request, metadata=metadata or self.service.alice.metadata)

    def stream(self, *requests: pb.StreamRequest) -> list[pb.StreamResponse]:
        return list(self.service.stub.Stream(iter(requests), metadata=self.service.alice.metadata))


def _open(world: World) -> pb.StreamRequest:
    return pb.StreamRequest(open=pb.OpenStream(session_id=world.session_id))


def _query(world: World, **params) -> pb.QueryAnswer:
    prompt = pb.Prompt(input=pb.Input(text=b"?"), params=pb.SamplingParams(**params))
    request = pb.QueryRequest(session_id=world.session_id, prompt=prompt)
    return world.service.stub.Query(request, metadata=world.service.alice.metadata)


def _append_past_its_deadline(world: World) -> None:
    """The model thread is busy past the append's deadline: the append must be dropped,
    not applied late."""
    scheduler = world.service.thread.server.scheduler
    busy = world.service.thread.submit(scheduler.call(time.sleep, 1.0))
    try:
        world.service.stub.Append(
            pb.AppendRequest(session_id=world.session_id, input=pb.Input(text=b"late")),
            metadata=world.service.alice.metadata,
            timeout=0.3,
        )
    finally:
        busy.result(10)


CASES: dict[str, tuple[Code, Callable[[World], object]]] = {
    "empty input": (Code.INVALID_ARGUMENT, lambda w: w.append()),
    "oversized message": (
        Code.RESOURCE_EXHAUSTED,
        lambda w: w.append(text=b"a" * (MAX_MESSAGE_BYTES + 1)),
    ),
    "more tokens than a request may carry": (
        Code.INVALID_ARGUMENT,
        lambda w: w.append(token_ids=[65] * (MAX_TOKENS_PER_REQUEST + 1)),
    ),
    "id equal to the vocabulary size": (
        Code.INVALID_ARGUMENT,
        lambda w: w.append(token_ids=[1, 260]),
    ),
    "id 2**32 - 1": (Code.INVALID_ARGUMENT, lambda w: w.append(token_ids=[2**32 - 1])),
    "ids and text together": (Code.INVALID_ARGUMENT, lambda w: w.append(token_ids=[1], text=b"a")),
    "malformed UTF-8": (Code.INVALID_ARGUMENT, lambda w: w.append(text=b"ok \xff\xfe")),
    "truncated UTF-8": (Code.INVALID_ARGUMENT, lambda w: w.append(text=b"\xe2\x82")),
    "unknown session": (
        Code.NOT_FOUND,
        lambda w: w.append(session_id=str(uuid.uuid4()), text=b"a"),
    ),
    "another tenant's session: append": (
        Code.NOT_FOUND,
        lambda w: w.append(metadata=w.service.bob.metadata, text=b"a"),
    ),
    "another tenant's session: get": (
        Code.NOT_FOUND,
        lambda w: w.service.stub.GetSession(
            pb.GetSessionRequest(session_id=w.session_id), metadata=w.service.bob.metadata
        ),
    ),
    "another tenant's session: delete": (
        Code.NOT_FOUND,
        lambda w: w.service.stub.DeleteSession(
            pb.DeleteSessionRequest(session_id=w.session_id), metadata=w.service.bob.metadata
        ),
    ),
    "another tenant's session: fork": (
        Code.NOT_FOUND,
        lambda w: w.service.stub.ForkSession(
            pb.ForkSessionRequest(session_id=w.session_id), metadata=w.service.bob.metadata
        ),
    ),
    "missing key": (
        Code.UNAUTHENTICATED,
        lambda w: w.service.stub.Append(
            pb.AppendRequest(session_id=w.session_id, input=pb.Input(text=b"a"))
        ),
    ),
    "wrong key": (
        Code.UNAUTHENTICATED,
        lambda w: w.append(metadata=(("authorization", "Bearer msk_0123_wrong"),), text=b"a"),
    ),
    "not a bearer key": (
        Code.UNAUTHENTICATED,
        lambda w: w.append(metadata=(("authorization", "Basic YWxpY2U="),), text=b"a"),
    ),
    "expired deadline": (Code.DEADLINE_EXCEEDED, lambda w: _append_past_its_deadline(w)),
    "sampling params out of range": (Code.INVALID_ARGUMENT, lambda w: _query(w, top_p=2.0)),
    "stream without open": (
        Code.INVALID_ARGUMENT,
        lambda w: w.stream(pb.StreamRequest(append=pb.Input(text=b"a"))),
    ),
    "stream opened twice": (Code.INVALID_ARGUMENT, lambda w: w.stream(_open(w), _open(w))),
    "stream on another tenant's session": (
        Code.NOT_FOUND,
        lambda w: list(w.service.stub.Stream(iter([_open(w)]), metadata=w.service.bob.metadata)),
    ),
    "bad append in a stream": (
        Code.INVALID_ARGUMENT,
        lambda w: w.stream(_open(w), pb.StreamRequest(request_id=1, append=pb.Input())),
    ),
    "export chunks over the message limit": (
        Code.INVALID_ARGUMENT,
        lambda w: list(
            w.service.stub.ExportSession(
                pb.ExportSessionRequest(session_id=w.session_id, chunk_bytes=MAX_MESSAGE_BYTES),
                metadata=w.service.alice.metadata,
            )
        ),
    ),
    "import without a header": (
        Code.INVALID_ARGUMENT,
        lambda w: w.service.stub.ImportSession(
            iter([pb.ImportSessionRequest(data=b"x")]), metadata=w.service.alice.metadata
        ),
    ),
    "import of bytes that are no export": (
        Code.INVALID_ARGUMENT,
        lambda w: w.service.stub.ImportSession(
            iter(
                [
                    pb.ImportSessionRequest(header=pb.ImportHeader(name="junk")),
                    pb.ImportSessionRequest(data=b"not an export" * 100),
                ]
            ),
            metadata=w.service.alice.metadata,
        ),
    ),
    "admin call with a tenant's key": (
        Code.PERMISSION_DENIED,
        lambda w: w.service.admin.GetStats(pb.GetStatsRequest(), metadata=w.service.alice.metadata),
    ),
    "evict to the device tier": (
        Code.INVALID_ARGUMENT,
        lambda w: w.service.admin.EvictSession(
            pb.EvictSessionRequest(session_id=w.session_id, tier=pb.TIER_DEVICE),
            metadata=(("authorization", f"Bearer {ADMIN_KEY}"),),
        ),
    ),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, engine: StreamingEngine) -> Iterator[World]:
    service = start_service(Path(tmp_path_factory.mktemp("bad-input")) / "data", engine)
    session = service.stub.CreateSession(
        pb.CreateSessionRequest(name="target"), metadata=service.alice.metadata
    )
    world = World(service, session.session_id)
    world.append(text=b"Some tokens the memory has already seen. " * 10)
    yield world
    stop_service(service)


def _snapshot(world: World) -> tuple:
    stub, service = world.service.stub, world.service
    export = b"".join(
        chunk.data
        for chunk in stub.ExportSession(
            pb.ExportSessionRequest(session_id=world.session_id), metadata=service.alice.metadata
        )
    )
    # The header's checksum covers every tensor and counter (and is verified on decoding).
    state = decode_checkpoint(export, source=Path("export")).header
    lists = [
        stub.ListSessions(pb.ListSessionsRequest(), metadata=tenant.metadata)
        for tenant in (service.alice, service.bob)
    ]
    stats = service.admin.GetStats(
        pb.GetStatsRequest(), metadata=(("authorization", f"Bearer {ADMIN_KEY}"),)
    )
    return state, lists, (stats.appends, stats.tokens_appended)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_gets_its_status_and_changes_nothing(world: World, case: str) -> None:
    code, call = CASES[case]
    before = _snapshot(world)
    with pytest.raises(grpc.RpcError) as raised:
        call(world)
    assert raised.value.code() == code, raised.value.details()
    assert raised.value.details(), "the status carries no message"
    assert _snapshot(world) == before


def test_sessions_quota_is_resource_exhausted(world: World) -> None:
    carol = create_tenant(world.service.database, "carol", max_sessions=1)
    stub = world.service.stub
    stub.CreateSession(pb.CreateSessionRequest(name="one"), metadata=carol.metadata)
    with pytest.raises(grpc.RpcError) as raised:
        stub.CreateSession(pb.CreateSessionRequest(name="two"), metadata=carol.metadata)
    assert raised.value.code() == Code.RESOURCE_EXHAUSTED
    listed = stub.ListSessions(pb.ListSessionsRequest(), metadata=carol.metadata).sessions
    assert [s.name for s in listed] == ["one"]


def test_rate_limit_is_resource_exhausted_and_appends_nothing(world: World) -> None:
    dave = create_tenant(world.service.database, "dave", tokens_per_minute=100)
    stub = world.service.stub
    session = stub.CreateSession(pb.CreateSessionRequest(), metadata=dave.metadata)
    append = pb.AppendRequest(session_id=session.session_id, input=pb.Input(text=b"x" * 60))
    assert stub.Append(append, metadata=dave.metadata).position == 60
    with pytest.raises(grpc.RpcError) as raised:
        stub.Append(append, metadata=dave.metadata)
    assert raised.value.code() == Code.RESOURCE_EXHAUSTED
    assert "100 tokens per minute" in raised.value.details()
    get = pb.GetSessionRequest(session_id=session.session_id)
    assert stub.GetSession(get, metadata=dave.metadata).position == 60
