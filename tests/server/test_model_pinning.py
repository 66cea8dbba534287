"""A session is pinned to the model that wrote it: a server restarted with another model
(a new default shipped, say) refuses the old session's calls with FAILED_PRECONDITION
naming both models, and changes nothing; the old model serves it again afterwards."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from memsvc.model.io import model_hash
from memsvc.proto.v1 import memsvc_pb2 as pb
from memsvc.server.backends import load_engine
from tests.server.harness import save_tiny_model, start_service, stop_service


def test_a_session_of_another_model_fails_clearly_and_is_left_unchanged(tmp_path: Path) -> None:
    old_dir = save_tiny_model(tmp_path / "old", seed=0)
    new_dir = save_tiny_model(tmp_path / "new", seed=1)
    old_hash, new_hash = model_hash(old_dir), model_hash(new_dir)
    assert old_hash != new_hash
    data = tmp_path / "data"

    first = start_service(data, load_engine(old_dir))
    alice = first.alice
    try:
        session = first.stub.CreateSession(
            pb.CreateSessionRequest(name="notes"), metadata=alice.metadata
        )
        ack = first.stub.Append(
            pb.AppendRequest(
                session_id=session.session_id, input=pb.Input(text=b"the code is 4417")
            ),
            metadata=alice.metadata,
        )
        assert session.model_hash == old_hash
    finally:
        stop_service(first)

    second = start_service(data, load_engine(new_dir))
    try:
        calls = {
            "append": lambda: second.stub.Append(
                pb.AppendRequest(session_id=session.session_id, input=pb.Input(text=b"more")),
                metadata=alice.metadata,
            ),
            "query": lambda: second.stub.Query(
                pb.QueryRequest(
                    session_id=session.session_id,
                    prompt=pb.Prompt(
                        input=pb.Input(text=b"the code is"),
                        params=pb.SamplingParams(max_new_tokens=4, temperature=0),
                    ),
                ),
                metadata=alice.metadata,
            ),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, name
            assert old_hash in caught.value.details(), name
            assert new_hash in caught.value.details(), name
        listed = second.stub.GetSession(
            pb.GetSessionRequest(session_id=session.session_id), metadata=alice.metadata
        )
        assert (listed.model_hash, listed.position) == (old_hash, ack.position)
    finally:
        stop_service(second)

    third = start_service(data, load_engine(old_dir))
    try:
        again = third.stub.Append(
            pb.AppendRequest(
                session_id=session.session_id,
                input=pb.Input(text=b" and again", expected_position=ack.position),
            ),
            metadata=alice.metadata,
        )
        assert again.position == ack.position + len(b" and again")
    finally:
        stop_service(third)
