"""Fixtures of the reliability suites: the server harness's tiny model, its engine, and one
in-process server per module (tests/server/harness.py; nothing is mocked)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from memsvc.engine import StreamingEngine
from memsvc.reliability.fuzz.calls import CHANNEL_OPTIONS
from tests.server import harness
from tests.server.harness import Service, start_service, stop_service

# The harness's session-wide tiny model and its engine.
model_dir = harness.model_dir
engine = harness.engine


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, engine: StreamingEngine) -> Iterator[Service]:
    """A server on embedded defaults, with tenants alice and bob, for the whole module."""
    service = start_service(tmp_path_factory.mktemp("reliability") / "data", engine)
    yield service
    stop_service(service)


@pytest.fixture(scope="module")
def channel(server: Service) -> Iterator[grpc.Channel]:
    """A channel onto the server that sends what the server allows, and more."""
    with grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS) as opened:
        yield opened
