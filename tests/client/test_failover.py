"""Every call follows failover, streams included: three replicas as `memsvc serve`
processes (tests/server/test_cluster.py's), the owner of two sessions killed (-9), and
`generate` and `export` then succeed through the sessions' next owner, from the blocking
and the asyncio SDK alike."""

from __future__ import annotations

import asyncio
import time

from memsvc.client import AsyncMemoryClient, AsyncSession, MemoryClient
from memsvc.server.process import ServerProcess
from memsvc.store.database import Database
from memsvc.store.hot_state import RedisHotStateTracker
from tests.server.harness import create_tenant
from tests.server.test_cluster import RETRY, cluster  # noqa: F401

SAMPLING = {"max_new_tokens": 5, "allow_eos": False, "seed": 3}


def test_generate_and_export_fail_over_when_the_owner_is_killed(
    cluster: tuple[list[ServerProcess], Database],  # noqa: F811
    redis_client,
    redis_namespace: str,
) -> None:
    replicas, database = cluster
    tenant = create_tenant(database, "failover")
    tracker = RedisHotStateTracker(redis_client, redis_namespace)
    addresses = [r.address for r in replicas]  # r0 first: sessions are served there
    loop = asyncio.new_event_loop()

    async def async_setup() -> tuple[AsyncMemoryClient, AsyncSession]:
        client = AsyncMemoryClient(addresses, tenant.api_key, retry=RETRY)
        session = await client.create_session("async")
        await session.append("held by r0, written by the asyncio SDK")
        return client, session

    with MemoryClient(addresses, tenant.api_key, retry=RETRY) as client:
        session = client.create_session("sync")
        session.append("held by r0, written by the blocking SDK")
        async_client, async_session = loop.run_until_complete(async_setup())
        assert [tracker.lease_holder(s.id).node for s in (session, async_session)] == ["r0"] * 2
        # Both clients know r0 as the owner: their next calls go there first.
        assert client.replicas.pick(session.id)[0] == replicas[0].address
        assert async_client.replicas.pick(async_session.id)[0] == replicas[0].address

        replicas[0].kill()
        time.sleep(0.5)  # the channels see the connection reset; calls now find no server

        before = session.position
        text = "".join(session.generate("Go", **SAMPLING))
        assert text and session.refresh().position == before + len("Go") + 5
        assert tracker.lease_holder(session.id).node in {"r1", "r2"}
        exported = list(session.export(chunk_bytes=1000))
        assert len(exported) > 1
        copy = client.import_session(exported, "copy")
        assert copy.info.position == session.info.position

        async def async_after_kill() -> tuple[str, list[bytes], int]:
            before = async_session.position
            text = "".join([t async for t in async_session.generate("Go", **SAMPLING)])
            assert (await async_session.refresh()).position == before + len("Go") + 5
            chunks = [c async for c in async_session.export(chunk_bytes=1000)]
            copy = await async_client.import_session(chunks, "async-copy")
            await async_client.close()
            return text, chunks, copy.info.position

        text, chunks, copied = loop.run_until_complete(async_after_kill())
        loop.close()
        assert text and len(chunks) > 1 and copied == async_session.info.position
        assert tracker.lease_holder(async_session.id).node in {"r1", "r2"}
