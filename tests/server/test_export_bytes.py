"""Exports are byte-identical for an identical state (the safetensors library writes its
metadata in a different order each call; the header's keys are now sorted)."""

from __future__ import annotations

import json

from memsvc.client import MemoryClient
from tests.server.harness import Service


def _export(session) -> bytes:
    return b"".join(session.export(chunk_bytes=1 << 16))


def test_exports_of_one_state_are_byte_identical(service: Service) -> None:
    with MemoryClient(service.address, service.alice.api_key) as client:
        session = client.create_session("bytes")
        session.append("the same state, exported again and again " * 8)
        exports = {_export(session) for _ in range(6)}
        assert len(exports) == 1
        (data,) = exports
        # An imported copy holds the identical state: its export is the same file.
        copy = client.import_session([data], "copy")
        assert _export(copy) == data
        session.append("one more token moves the state on")
        assert _export(session) != data

    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    metadata = header["__metadata__"]
    assert list(metadata) == sorted(metadata)
    assert list(header) == sorted(header)
