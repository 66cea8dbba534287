"""A Stream's appends in flight together (`ReadAhead`, `AppendChain`): applied in order,
answered in order, and none applied behind one that failed."""

from __future__ import annotations

import itertools

import grpc
import pytest
import torch

from memsvc.proto.v1 import memsvc_pb2 as pb
from memsvc.server.read_ahead import DEPTH as READ_AHEAD
from tests.server.harness import Service


def _create(service: Service) -> str:
    meta = service.alice.metadata
    return service.stub.CreateSession(pb.CreateSessionRequest(), metadata=meta).session_id


def _position(service: Service, session_id: str) -> int:
    request = pb.GetSessionRequest(session_id=session_id)
    return service.stub.GetSession(request, metadata=service.alice.metadata).position


def _stream(session_id: str, inputs: list[pb.Input]) -> list[pb.StreamRequest]:
    """The whole stream at once: every append is sent before any answer comes."""
    return [
        pb.StreamRequest(request_id=1, open=pb.OpenStream(session_id=session_id)),
        *(pb.StreamRequest(request_id=2 + i, append=m) for i, m in enumerate(inputs)),
    ]


def test_appends_in_flight_on_one_stream_equal_appending_them_one_by_one(
    service: Service,
) -> None:
    # Text, not random bytes: those would set off the guards' anomalous-input mitigation,
    # whose timing is the guards' own.
    text = b"Agents stream what they read and do, turn by turn, and ask about it later. " * 40
    generator = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 90, (24,), generator=generator).tolist()
    starts = torch.randint(0, 900, (24,), generator=generator).tolist()
    pieces = [list(text[a : a + n]) for a, n in zip(starts, lengths, strict=True)]
    streamed, unary = _create(service), _create(service)
    meta = service.alice.metadata
    inputs = [pb.Input(token_ids=piece) for piece in pieces]
    responses = list(service.stub.Stream(iter(_stream(streamed, inputs)), metadata=meta))
    acks = [r.ack for r in responses[1:]]
    assert [r.request_id for r in responses] == list(range(1, 2 + len(pieces)))
    one_by_one = [
        service.stub.Append(pb.AppendRequest(session_id=unary, input=m), metadata=meta)
        for m in inputs
    ]
    position = 0
    for ack, piece in zip(acks, pieces, strict=True):
        position += len(piece)
        assert (ack.position, ack.appended) == (position, len(piece))
    # Appends waiting together may be applied together: an acknowledgement's memory
    # statistics are those after the last append applied with it (the proto's rule),
    # i.e. one of the appends at or after it, within what the server reads ahead.
    closing = [_closing(ack, one_by_one[i : i + READ_AHEAD + 1]) for i, ack in enumerate(acks)]
    assert closing[-1] == 0  # the last one is its own
    assert all(a <= b + 1 for a, b in itertools.pairwise(closing))
    assert _position(service, streamed) == position
    greedy = pb.Prompt(
        input=pb.Input(text=b"?"),
        params=pb.SamplingParams(max_new_tokens=8, temperature=0, allow_eos=False),
    )
    answers = [
        service.stub.Query(pb.QueryRequest(session_id=s, prompt=greedy), metadata=meta)
        for s in (streamed, unary)
    ]
    assert answers[0].token_ids == answers[1].token_ids


def _closing(ack: pb.AppendAck, later: list[pb.AppendAck]) -> int:
    """How many appends after ``ack``'s the one whose statistics it carries is."""
    for offset, want in enumerate(later):
        # float fields on the wire; the C++ chunk path may take over between the two
        if (ack.writes_applied, ack.writes_skipped) == (
            want.writes_applied,
            want.writes_skipped,
        ) and (
            ack.memory_norm == pytest.approx(want.memory_norm, rel=1e-5)
            and ack.surprise == pytest.approx(want.surprise, rel=1e-5, abs=1e-7)
        ):
            return offset
    raise AssertionError(f"no append at or after {ack.position} left these statistics: {ack}")


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (pb.Input(text=b"efgh", expected_position=99), grpc.StatusCode.FAILED_PRECONDITION),
        (pb.Input(token_ids=[1, 1_000_000]), grpc.StatusCode.INVALID_ARGUMENT),
    ],
    ids=["refused-when-applied", "refused-on-arrival"],
)
def test_nothing_behind_a_failed_append_on_the_stream_goes_in(
    service: Service, bad: pb.Input, code: grpc.StatusCode
) -> None:
    session_id = _create(service)
    good = [pb.Input(text=b"x" * n) for n in (5, 7, 9, 11)]
    inputs = [pb.Input(text=b"abcd"), bad, *good]
    responses = []
    with pytest.raises(grpc.RpcError) as caught:
        for response in service.stub.Stream(
            iter(_stream(session_id, inputs)), metadata=service.alice.metadata
        ):
            responses.append(response)
    assert caught.value.code() is code
    assert [r.WhichOneof("result") for r in responses] == ["opened", "ack"]
    assert responses[1].ack.position == 4
    assert _position(service, session_id) == 4  # the appends sent after it never went in
    # The stream's session takes appends again, from where it stood.
    request = pb.AppendRequest(session_id=session_id, input=pb.Input(text=b"yz"))
    assert service.stub.Append(request, metadata=service.alice.metadata).position == 6
