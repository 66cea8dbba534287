"""Damaged session files (``FILE_MUTATIONS``, ``CHECKPOINT_MUTATIONS``): every reader gives
back exactly what was written, or refuses with its own documented error; nothing else.

* A checkpoint decodes to the original header and tensors, or raises CheckpointError; the
  restore path's ``newest_valid_checkpoint`` skips it for an older good one, never raises.
* An export imports to the original state, or is refused with InvalidRequestError or
  IncompatibleStateError (``portable.py``); over gRPC, with a clean status and no session.
  A crafted export (``STATE_EDITS``: a valid checksum over wrong tensors) is refused the
  same way, or holds a state the engine can go on serving.
* A write-ahead log yields records that are a prefix of the written ones, stopping at the
  first damaged record with its DamageKind (or raises CorruptWalHeaderError for a damaged
  header); opening it for appending cuts exactly there, and appends follow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from memsvc.engine import StreamingEngine
from memsvc.model import ModelState
from memsvc.proto.v1 import memsvc_pb2 as pb
from memsvc.reliability.fuzz.calls import bearer
from memsvc.reliability.fuzz.campaign import create_session, export_session, server_alive
from memsvc.reliability.fuzz.mutations import Mutations
from memsvc.reliability.fuzz.strategies import (
    CHECKPOINT_MUTATIONS,
    CHECKPOINT_REGRESSIONS,
    FILE_MUTATIONS,
    STATE_EDITS,
    STATE_REGRESSIONS,
)
from memsvc.sessions.api import IncompatibleStateError, InvalidRequestError
from memsvc.sessions.checkpoint import (
    CheckpointError,
    decode_checkpoint,
    encode_checkpoint,
    newest_valid_checkpoint,
)
from memsvc.sessions.durability import StateIdentity
from memsvc.sessions.portable import chunked, decode_export, encode_export
from memsvc.sessions.wal import (
    HEADER_SIZE,
    CorruptWalHeaderError,
    DamageKind,
    WriteAheadLog,
    read_wal,
)
from tests.server.harness import Service

Code = grpc.StatusCode
# Deterministic: CI sees the same damage every run.
FILES = settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CRAFTED = settings(FILES, max_examples=60)  # each re-encodes a state and appends to it
OVER_GRPC = settings(FILES, max_examples=40)
WAL_START = 1000  # the log's first position


class Written:
    """What was written and how it reads back, for one module; prints as a name only, so
    that hypothesis's reports show the damage, not the files."""

    def __init__(self, engine: StreamingEngine, directory: Path) -> None:
        self.engine = engine
        self.identity = StateIdentity.of(engine.model)
        # A state that has read some tokens: pending partial-chunk buffers, a moved memory.
        tokens = torch.tensor(list(b"What the memory read before the file was damaged. " * 3))
        self.state = engine.append(engine.init_state(), tokens)[0]
        self.export = encode_export(self.state, self.identity)
        # A checkpoint has a log offset, unlike an export.
        self.checkpoint, _ = encode_checkpoint(
            self.state.to_dict(),
            model_hash=self.identity.model_hash,
            config_hash=self.identity.config_hash,
            position=int(self.state.position[0]),
            wal_offset=4242,
        )
        self.decoded = decode_checkpoint(self.checkpoint, source=Path("original"))
        path = directory / "session.wal"
        rng = np.random.default_rng(0)
        with WriteAheadLog.open(path, start_position=WAL_START) as wal:
            for _ in range(8):
                wal.append(wal.next_position, rng.integers(0, 260, size=int(rng.integers(1, 30))))
            wal.flush_and_sync()
        self.wal = path.read_bytes()
        self.records = _records(read_wal(path))
        self.scratch = directory / "scratch"  # every example overwrites its files
        self.scratch.mkdir()

    def imported(self, data: bytes, chunk: int) -> ModelState | None:
        """The state an export holds (sent in chunks of ``chunk`` bytes), or None if it is
        refused with one of the import's documented errors."""
        try:
            return decode_export(
                chunked(data, chunk),
                self.identity,
                self.engine.init_state(),
                self.engine.chunk_size,
            )
        except (InvalidRequestError, IncompatibleStateError):
            return None

    def __repr__(self) -> str:
        return "<the files as written>"


def _records(reader: Iterator) -> list[tuple]:
    """A log's records as (position, tokens, end offset)."""
    return [(r.position, r.tokens.tolist(), r.end_offset) for r in reader]


def _same_tensors(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> bool:
    return found.keys() == expected.keys() and all(
        found[name].dtype == expected[name].dtype and torch.equal(found[name], expected[name])
        for name in expected
    )


@pytest.fixture(scope="module")
def written(engine: StreamingEngine, tmp_path_factory: pytest.TempPathFactory) -> Written:
    return Written(engine, tmp_path_factory.mktemp("written"))


def _regressions(mutations: tuple[Mutations, ...], **others: object) -> Callable:
    """Runs the test first with each of ``mutations`` (files that once got past a reader)."""

    def explicit(test: Callable) -> Callable:
        for mutation in mutations:
            test = example(mutation=mutation, **others)(test)
        return test

    return explicit


@FILES
@_regressions(CHECKPOINT_REGRESSIONS)
@given(mutation=CHECKPOINT_MUTATIONS)
def test_a_damaged_checkpoint_reads_whole_or_raises_a_checkpoint_error(
    written: Written, mutation: Mutations
) -> None:
    damaged = mutation.apply(written.checkpoint)
    try:
        decoded = decode_checkpoint(damaged, source=Path("damaged"))
    except CheckpointError:
        decoded = None
    if decoded is not None:
        assert decoded.header == written.decoded.header
        assert _same_tensors(decoded.tensors, written.decoded.tensors)
    # Restore tries generations newest first: the damaged one never stops it.
    newest, older = written.scratch / "ckpt-2.safetensors", written.scratch / "ckpt-1.safetensors"
    newest.write_bytes(damaged)
    older.write_bytes(written.checkpoint)
    found = newest_valid_checkpoint([newest, older])
    assert found is not None
    assert found.path == (older if decoded is None else newest)


@FILES
@_regressions(CHECKPOINT_REGRESSIONS, chunk=1 << 20)
@given(mutation=CHECKPOINT_MUTATIONS, chunk=st.integers(1, 64 << 10))
def test_a_damaged_export_imports_whole_or_is_refused(
    written: Written, mutation: Mutations, chunk: int
) -> None:
    imported = written.imported(mutation.apply(written.export), chunk)
    assert imported is None or _same_tensors(imported.to_dict(), written.state.to_dict())


@CRAFTED
@_regressions(STATE_REGRESSIONS)
@given(mutation=STATE_EDITS)
def test_a_crafted_export_is_refused_or_can_be_served(
    written: Written, mutation: Mutations
) -> None:
    # A crafted file passes its checksum: the import must judge the state itself.
    imported = written.imported(mutation.apply(written.export), 1 << 20)
    if imported is None:
        return
    tokens = torch.tensor(list(b"still serving"))
    after, _ = written.engine.append(imported, tokens)
    assert int(after.position[0]) == int(imported.position[0]) + len(tokens)
    assert all(
        bool(torch.isfinite(tensor).all())
        for tensor in after.to_dict().values()
        if tensor.is_floating_point()
    )


@FILES
@given(mutation=FILE_MUTATIONS)
def test_a_damaged_log_yields_an_intact_prefix_and_reopens_there(
    written: Written, mutation: Mutations
) -> None:
    damaged = mutation.apply(written.wal)
    path = written.scratch / "session.wal"
    path.write_bytes(damaged)
    reader = read_wal(path)
    try:
        records = _records(reader)
    except CorruptWalHeaderError:
        assert damaged[:HEADER_SIZE] != written.wal[:HEADER_SIZE]
        return
    assert records == written.records[: len(records)]
    end = records[-1][2] if records else 0
    position = records[-1][0] + len(records[-1][1]) if records else WAL_START
    assert (reader.end_offset, reader.next_position) == (end, position)
    if reader.damage is not None:
        assert isinstance(reader.damage.kind, DamageKind)
        assert reader.damage.offset == end
    if damaged == written.wal:
        assert (records, reader.damage) == (written.records, None)
    with WriteAheadLog.open(path) as wal:
        assert wal.recovered_damage == reader.damage
        assert (wal.end_offset, wal.next_position) == (end, position)
        appended_end = wal.append(position, [7, 8, 9])
        wal.flush_and_sync()
    reread = read_wal(path)
    assert _records(reread) == [*records, (position, [7, 8, 9], appended_end)]
    assert reread.damage is None


# ---- over gRPC ---------------------------------------------------------------------------


class Importer:
    """Imports over gRPC into the module's server, as alice; prints as a name only."""

    def __init__(self, server: Service, channel: grpc.Channel) -> None:
        self.server, self.channel, self.key = server, channel, server.alice.api_key
        session_id = create_session(channel, self.key, "exported", b"Exported, then damaged. " * 8)
        self.export = export_session(channel, self.key, session_id)
        self.checksum = decode_checkpoint(self.export, source=Path("export")).header.checksum
        self.server.stub.DeleteSession(
            pb.DeleteSessionRequest(session_id=session_id), metadata=bearer(self.key)
        )

    def sessions(self) -> list[str]:
        listed = self.server.stub.ListSessions(pb.ListSessionsRequest(), metadata=bearer(self.key))
        return [session.session_id for session in listed.sessions]

    def __repr__(self) -> str:
        return "<alice, importing into the module's server>"


@pytest.fixture(scope="module")
def importer(server: Service, channel: grpc.Channel) -> Importer:
    return Importer(server, channel)


@OVER_GRPC
@_regressions(CHECKPOINT_REGRESSIONS, chunk_bytes=64 << 10)
@given(mutation=CHECKPOINT_MUTATIONS, chunk_bytes=st.integers(1 << 10, 128 << 10))
def test_a_damaged_export_over_grpc_is_refused_cleanly_and_creates_nothing(
    importer: Importer, mutation: Mutations, chunk_bytes: int
) -> None:
    before = importer.sessions()
    requests = [
        pb.ImportSessionRequest(header=pb.ImportHeader(name="damaged")),
        *(
            pb.ImportSessionRequest(data=chunk)
            for chunk in chunked(mutation.apply(importer.export), chunk_bytes)
        ),
    ]
    stub, key = importer.server.stub, bearer(importer.key)
    try:
        session = stub.ImportSession(iter(requests), metadata=key)
    except grpc.RpcError as error:
        assert error.code() in {
            Code.INVALID_ARGUMENT,
            Code.FAILED_PRECONDITION,
            Code.RESOURCE_EXHAUSTED,
        }, f"{error.code().name}: {error.details()}"
        assert importer.sessions() == before
    else:  # the damage missed what the export says (header padding, a foreign key)
        again = export_session(importer.channel, importer.key, session.session_id)
        assert decode_checkpoint(again, source=Path("again")).header.checksum == importer.checksum
        stub.DeleteSession(pb.DeleteSessionRequest(session_id=session.session_id), metadata=key)
    assert server_alive(importer.channel)
