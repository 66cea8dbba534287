"""The SDK against a real server on loopback: the five-line usage, streaming, typed errors."""

from __future__ import annotations

import asyncio

import pytest

from memsvc.client import AsyncMemoryClient, MemoryClient
from memsvc.client.admin import AdminClient
from memsvc.client.errors import (
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from tests.server.harness import ADMIN_KEY, Service, create_tenant


def test_five_lines(service: Service) -> None:
    with MemoryClient(service.address, service.alice.api_key) as client:
        session = client.create_session("notes")
        session.append("The pass key is 71432. Remember it.")
        answer = session.query("What is the pass key?", max_new_tokens=8, temperature=0)
        assert session.refresh().position == len("The pass key is 71432. Remember it.")
    assert isinstance(answer, str) and len(answer) <= 8


def test_sync_session_lifecycle(service: Service) -> None:
    with MemoryClient(service.address, service.alice.api_key) as client:
        session = client.create_session("notes")
        assert session.info.position == 0
        assert session.append("héllo").position == 6
        assert session.append(b"abc").position == 9
        assert session.append([1, 2, 257]).position == 12
        acks = list(session.append_stream(["x" * 100, [65] * 50, b"yz"], window=2))
        assert [a.position for a in acks] == [112, 162, 164]
        assert [a.appended for a in acks] == [100, 50, 2]

        before = session.refresh().position
        q1 = session.query("Who?", max_new_tokens=4, temperature=0)
        q2 = session.query("Who?", max_new_tokens=4, temperature=0)
        assert q1 == q2 and session.refresh().position == before  # a query changes nothing

        pieces = list(session.generate("Go", max_new_tokens=6, seed=7, allow_eos=False))
        assert pieces
        assert session.refresh().position == before + 2 + 6

        checkpoint = session.checkpoint()
        assert checkpoint.position == session.info.position
        fork = session.fork("fork")
        copy = client.import_session(session.export(chunk_bytes=1000), "copy")
        assert fork.info.position == copy.info.position == session.info.position
        assert fork.query("Who?", max_new_tokens=4, temperature=0) == copy.query(
            "Who?", max_new_tokens=4, temperature=0
        )
        names = sorted(s.name for s in client.list_sessions())
        assert names == ["copy", "fork", "notes"]
        fork.delete()
        with pytest.raises(NotFoundError):
            client.open_session(fork.id)
        assert client.open_session(session.id).info.position == session.info.position


def test_async_session_lifecycle(service: Service) -> None:
    async def main() -> None:
        async with AsyncMemoryClient(service.address, service.alice.api_key) as client:
            session = await client.create_session("async")
            assert (await session.append("abc")).position == 3

            async def pieces():
                for i in range(3):
                    yield [70 + i] * 10

            positions = [a.position async for a in session.append_stream(pieces())]
            assert positions == [13, 23, 33]
            answer = await session.query("?", max_new_tokens=3, temperature=0)
            assert answer == await session.query("?", max_new_tokens=3, temperature=0)
            pieces = [t async for t in session.generate("!", max_new_tokens=3, allow_eos=False)]
            assert pieces
            assert (await session.refresh()).position == 34 + 3
            chunks = [c async for c in session.export(chunk_bytes=512)]
            copy = await client.import_session(chunks, "copy")
            assert copy.info.position == session.info.position
            fork = await session.fork()
            assert (await fork.checkpoint()).position == session.info.position
            assert {s.session_id for s in await client.list_sessions()} == {
                session.id,
                copy.id,
                fork.id,
            }
            await copy.delete()
            with pytest.raises(NotFoundError):
                await client.open_session(copy.id)

    asyncio.run(main())


def test_errors_are_typed(service: Service) -> None:
    with MemoryClient(service.address, service.alice.api_key) as client:
        session = client.create_session()
        with pytest.raises(InvalidArgumentError, match="outside the vocabulary"):
            session.append([300])
        with pytest.raises(InvalidArgumentError, match="not valid UTF-8"):
            session.append(b"\xff")
        with pytest.raises(InvalidArgumentError, match="not valid UTF-8"):
            list(session.append_stream(["ok", b"\xc3"]))
        with pytest.raises(ValueError, match="no_such_option"):
            session.query("?", no_such_option=1)
    with (
        MemoryClient(service.address, service.bob.api_key) as bob,
        pytest.raises(NotFoundError),
    ):
        bob.open_session(session.id)
    with (
        MemoryClient(service.address, "msk_0000_wrong") as stranger,
        pytest.raises(UnauthenticatedError),
    ):
        stranger.list_sessions()
    limited = create_tenant(service.database, "limited", max_sessions=0)
    with (
        MemoryClient(service.address, limited.api_key) as client,
        pytest.raises(ResourceExhaustedError),
    ):
        client.create_session()
    with (
        AdminClient(service.address, service.alice.api_key) as not_admin,
        pytest.raises(PermissionDeniedError),
    ):
        not_admin.stats()


def test_admin_client(service: Service) -> None:
    with MemoryClient(service.address, service.alice.api_key) as client:
        session = client.create_session()
        session.append("resident now")
    with AdminClient(service.address, ADMIN_KEY) as admin:
        resident = {r.session_id: r for r in admin.resident()}
        assert resident[session.id].tenant_id == service.alice.tenant_id
        assert resident[session.id].position == len("resident now")
        assert admin.stats().tokens_appended >= len("resident now")
        admin.evict(session.id)
        assert session.id not in {r.session_id for r in admin.resident()}
        with pytest.raises(NotFoundError):
            admin.evict(session.id)
    with MemoryClient(service.address, service.alice.api_key) as client:
        assert client.open_session(session.id).append("!").position == len("resident now!")
