"""`SessionOrder` alone: a session's calls take effect in arrival order (no server)."""

from __future__ import annotations

import asyncio

from memsvc.server.ordering import SessionOrder


async def _exclusive(order: SessionOrder, session_id: str, log: list[str], name: str) -> None:
    async with order.exclusive(session_id):
        log.append(name)


def test_an_exclusive_call_waits_for_earlier_appends_and_later_appends_wait_for_it() -> None:
    async def scenario() -> list[str]:
        order, log = SessionOrder(), []
        loop = asyncio.get_running_loop()
        first: asyncio.Future[None] = loop.create_future()
        await order.append("s", first)  # in flight
        checkpoint = asyncio.ensure_future(_exclusive(order, "s", log, "checkpoint"))
        later: asyncio.Future[None] = loop.create_future()
        queued = asyncio.ensure_future(order.append("s", later))
        await asyncio.sleep(0.01)
        assert log == [] and not queued.done()  # both wait for the first append
        log.append("first applied")
        first.set_result(None)
        await checkpoint
        await queued
        log.append("later queued")
        later.set_result(None)
        await asyncio.sleep(0)  # done callbacks run on the next turn of the loop
        assert order.waiting() == 0  # the line is gone once its calls are
        return log

    assert asyncio.run(scenario()) == ["first applied", "checkpoint", "later queued"]


def test_a_failed_append_still_lets_the_next_call_run() -> None:
    async def scenario() -> list[str]:
        order, log = SessionOrder(), []
        failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await order.append("s", failed)
        checkpoint = asyncio.ensure_future(_exclusive(order, "s", log, "checkpoint"))
        await asyncio.sleep(0.01)
        failed.set_exception(RuntimeError("refused"))
        failed.exception()  # its caller heard it
        await checkpoint
        return log

    assert asyncio.run(scenario()) == ["checkpoint"]


def test_a_call_cancelled_while_waiting_keeps_its_place() -> None:
    async def scenario() -> list[str]:
        order, log = SessionOrder(), []
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await order.append("s", first)
        cancelled = asyncio.ensure_future(_exclusive(order, "s", log, "cancelled"))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        after = asyncio.ensure_future(_exclusive(order, "s", log, "after"))
        await asyncio.sleep(0.01)
        assert log == []  # "after" still waits for the first append, behind the cancelled
        first.set_result(None)
        await after
        return log

    assert asyncio.run(scenario()) == ["after"]


def test_sessions_do_not_wait_for_each_other() -> None:
    async def scenario() -> list[str]:
        order, log = SessionOrder(), []
        busy: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await order.append("a", busy)
        await asyncio.wait_for(_exclusive(order, "b", log, "b"), 1)
        busy.set_result(None)
        return log

    assert asyncio.run(scenario()) == ["b"]
