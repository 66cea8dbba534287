"""Idempotent calls ride out a server that is not up yet; the others fail at once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from memsvc.client import MemoryClient, RetryPolicy
from memsvc.client.errors import UnavailableError
from memsvc.engine import StreamingEngine
from memsvc.server.app import ServerConfig
from memsvc.server.backends import open_database
from memsvc.server.process import free_port
from tests.server.harness import Service, create_tenant, start_service, stop_service


def test_backoff_doubles_up_to_its_cap_with_jitter() -> None:
    policy = RetryPolicy(attempts=6, initial_backoff_s=0.1, max_backoff_s=0.5, multiplier=2.0)
    delays = list(policy.delays())
    assert len(delays) == 5
    for delay, cap in zip(delays, (0.1, 0.2, 0.4, 0.5, 0.5), strict=True):
        assert cap / 2 <= delay <= cap


def test_calls_that_never_reached_a_server_are_retried_until_it_is_up(
    tmp_path: Path, engine: StreamingEngine
) -> None:
    data_dir = tmp_path / "data"
    database = open_database(data_dir, None)
    tenant = create_tenant(database, "early")
    database.dispose()
    port = free_port()
    config = ServerConfig(address=f"127.0.0.1:{port}", shutdown_grace_s=1.0)
    services: list[Service] = []
    starter = threading.Timer(1.0, lambda: services.append(start_service(data_dir, engine, config)))
    retry = RetryPolicy(attempts=40, initial_backoff_s=0.1, max_backoff_s=0.5)
    with MemoryClient(f"127.0.0.1:{port}", tenant.api_key, retry=retry) as client:
        started = time.monotonic()
        starter.start()
        try:
            # Not idempotent, but refused connections prove it was never sent.
            session = client.create_session("first")
            assert time.monotonic() - started >= 1.0
            assert [s.session_id for s in client.list_sessions()] == [session.id]
        finally:
            starter.join()
            for service in services:
                stop_service(service)


def test_retries_give_up_after_the_last_attempt() -> None:
    retry = RetryPolicy(attempts=3, initial_backoff_s=0.05)
    with MemoryClient(f"127.0.0.1:{free_port()}", "msk_0_key", retry=retry) as client:
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            client.list_sessions()
        assert time.monotonic() - started >= 0.05  # two pauses of at least 0.025 s and 0.05 s
