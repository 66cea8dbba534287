"""Logging: JSON lines carrying the tenant and session bound around the work."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
import structlog

from memsvc.obs.logging import configure_logging

bound = structlog.contextvars.bound_contextvars


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def events(err: str) -> list[dict]:
    return [json.loads(line) for line in err.splitlines() if line.strip()]


def test_events_inside_a_bound_context_carry_tenant_and_session(capsys):
    configure_logging("info", json=True)
    log = structlog.get_logger("memsvc.test")
    with bound(tenant="t1", session="s1"):
        log.info("append_acknowledged", position=4096)
        with bound(session="s2"):
            log.warning("mitigation_applied", kind="saturation")
    log.info("outside")
    first, inner, outside = events(capsys.readouterr().err)
    assert first["event"] == "append_acknowledged" and first["position"] == 4096
    assert (first["tenant"], first["session"], first["level"]) == ("t1", "s1", "info")
    assert (inner["tenant"], inner["session"]) == ("t1", "s2")
    assert "tenant" not in outside and "session" not in outside
    assert outside["timestamp"].endswith("Z")


def test_the_binding_follows_each_task_and_its_threads(capsys):
    configure_logging("info", json=True)
    log = structlog.get_logger("memsvc.test")

    async def rpc(session: str) -> None:
        with bound(tenant="t", session=session):
            await asyncio.sleep(0.01)  # the other task runs in between
            await asyncio.to_thread(log.info, "model_step")

    async def main() -> None:
        await asyncio.gather(rpc("a"), rpc("b"))

    asyncio.run(main())
    assert sorted(e["session"] for e in events(capsys.readouterr().err)) == ["a", "b"]


def test_the_level_filters(capsys):
    configure_logging("warning", json=True)
    log = structlog.get_logger("memsvc.test")
    log.info("quiet")
    log.warning("loud")
    assert [e["event"] for e in events(capsys.readouterr().err)] == ["loud"]
