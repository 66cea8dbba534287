"""The SDK core's decisions, without a server: the requests each call builds, what a
plan does after each outcome, and what a resumed append stream sends. (The decisions of
core/routing.py and core/failover.py alone: test_routing.py; against real replicas:
test_failover.py and tests/server/test_cluster.py.)"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from memsvc.client.core import calls
from memsvc.client.core.calls import Upload
from memsvc.client.core.handles import ClientCore, SessionCore
from memsvc.client.core.plans import END, Deliver, Failed, Pause, Read, Start, Steps
from memsvc.client.core.stream import AppendStream
from memsvc.client.errors import (
    FailedPreconditionError,
    MemsvcError,
    NotFoundError,
    UnavailableError,
)
from memsvc.client.retry import RetryPolicy
from memsvc.proto.v1 import memsvc_pb2 as pb
from memsvc.wire import OWNER_METADATA, POSITION_METADATA
from tests.client.test_routing import Refusal

Code = grpc.StatusCode
RESET = Refusal(Code.UNAVAILABLE, "Socket closed")  # the outcome is unknown
REFUSED = Refusal(Code.UNAVAILABLE, "failed to connect to all addresses")  # never sent


class Client(ClientCore[tuple[str, str]]):
    """A client whose replicas' "stubs" are their addresses: plans name where they go."""

    def __init__(self) -> None:
        retry = RetryPolicy(attempts=4, initial_backoff_s=0.01, max_backoff_s=0.01)
        super().__init__(["a:1", "b:2", "c:3"], "key", retry=retry)

    def _connect(self, address: str) -> tuple[str, str]:
        return address, address


class Stream:
    """A response stream as a plan sees it (only cancelled by `Steps`)."""

    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def moved(owner: str) -> Refusal:
    return Refusal(Code.UNAVAILABLE, "moved", **{OWNER_METADATA.replace("-", "_"): owner})


def session(client: Client, position: int = 0) -> SessionCore[Client]:
    return SessionCore(client, pb.Session(session_id="s", position=position))


# ---- calls: the requests, and which may be repeated ------------------------------------


def test_calls_say_where_they_go_and_whether_they_may_be_repeated() -> None:
    assert calls.query("s", "?", {}).idempotent and calls.export("s", 0).idempotent
    assert calls.checkpoint("s").resendable and calls.list_sessions().resendable
    for call in (calls.generate("s", "go", {}), calls.fork("s", ""), calls.delete_session("s")):
        assert call.session_id == "s" and not call.resendable
    assert not calls.create_session("n").resendable and calls.create_session("n").session_id is None
    assert calls.get_session("s", routed=True).session_id == "s"
    assert calls.get_session("s", routed=False).session_id is None


def test_an_append_is_resent_only_where_it_started() -> None:
    call = calls.append("s", "abc", 10)
    assert call.resendable and not call.request.input.HasField("expected_position")
    assert call.resend.input.expected_position == 10 and call.resend.input.text == b"abc"
    assert call.on_conflict(13) == pb.AppendAck(position=13, appended=3)  # applied already
    with pytest.raises(FailedPreconditionError, match="another writer"):
        call.on_conflict(12)


def test_generated_text_waits_for_a_whole_character_and_drops_special_ids() -> None:
    text = calls.GeneratedText()
    euro = "€".encode()
    assert text.feed(pb.GeneratedTokens(token_ids=[euro[0], 257])) == []
    assert text.feed(pb.GeneratedTokens(token_ids=[*euro[1:], 104])) == ["€h"]
    assert text.flush() == []
    assert calls.ExportedBytes().feed(pb.ExportChunk(data=b"xy")) == [b"xy"]


def test_an_import_uploads_the_header_then_the_callers_chunks() -> None:
    call = calls.import_session("copy", [b"a", b"b"])
    upload = call.request
    assert isinstance(upload, Upload) and upload.first.header.name == "copy"
    assert not upload.taken
    assert upload.take(b"a") == pb.ImportSessionRequest(data=b"a") and upload.taken


# ---- unary plans ---------------------------------------------------------------------


def test_an_answer_is_delivered_and_its_replica_preferred() -> None:
    client = Client()
    client.replicas.failed("a:1")
    plan = client.answer(calls.list_sessions())
    assert next(plan) == Start("b:2", "ListSessions", pb.ListSessionsRequest())
    assert plan.send("answer") == Deliver("answer")
    assert client.replicas.pick()[0] == "b:2"


def test_a_redirect_goes_to_the_owner_at_once() -> None:
    client = Client()
    plan = client.unary(calls.query("s", "?", {}))
    assert next(plan).stub == "a:1"
    step = plan.throw(moved("c:3"))
    assert isinstance(step, Start) and step.stub == "c:3"  # no pause
    with pytest.raises(StopIteration) as stop:
        plan.send("answer")
    assert stop.value.value == "answer"


def test_an_append_whose_outcome_is_unknown_is_resent_on_condition() -> None:
    client = Client()
    plan = client.unary(calls.append("s", "abc", 10))
    assert not next(plan).request.input.HasField("expected_position")
    assert isinstance(plan.throw(RESET), Pause)
    resent = plan.send(None)
    assert resent.stub == "b:2" and resent.request.input.expected_position == 10
    conflict = Refusal(Code.FAILED_PRECONDITION, **{POSITION_METADATA.replace("-", "_"): "13"})
    with pytest.raises(StopIteration) as stop:
        plan.throw(conflict)  # the first try was applied: an acknowledgement
    assert stop.value.value == pb.AppendAck(position=13, appended=3)


def test_a_call_that_may_not_be_repeated_raises_on_an_unknown_outcome() -> None:
    plan = Client().unary(calls.fork("s", "copy"))
    next(plan)
    with pytest.raises(UnavailableError, match="Socket closed"):
        plan.throw(RESET)


def test_a_replica_that_refused_without_knowing_the_owner_is_tried_again_later() -> None:
    # A replica that does not own the session refused it (so it never ran), and the dead
    # owner's address is gone: even a call that may not be repeated waits out the lease.
    plan = Client().unary(calls.generate("s", "go", {}))
    next(plan)
    assert isinstance(plan.throw(moved("")), Pause)
    assert isinstance(plan.send(None), Start)


def test_a_call_never_sent_is_repeated_whatever_it_is() -> None:
    plan = Client().unary(calls.fork("s", "copy"))
    next(plan)
    assert isinstance(plan.throw(REFUSED), Pause)
    assert plan.send(None).stub == "b:2"


def test_an_upload_that_took_the_callers_chunks_is_not_repeated() -> None:
    plan = Client().unary(calls.import_session("copy", [b"a"]))
    upload = next(plan).request
    upload.take(b"a")
    with pytest.raises(UnavailableError):
        plan.throw(REFUSED)  # even never sent: the chunk cannot be taken again


def test_other_failures_raise_their_typed_error() -> None:
    plan = Client().unary(calls.checkpoint("s"))
    next(plan)
    with pytest.raises(NotFoundError, match="no such session"):
        plan.throw(Refusal(Code.NOT_FOUND, "no such session"))


def test_failover_gives_up_when_its_attempts_run_out() -> None:
    plan = Client().unary(calls.checkpoint("s"))
    next(plan)
    for _ in range(3):  # attempts=4: three pauses
        assert isinstance(plan.throw(RESET), Pause)
        assert isinstance(plan.send(None), Start)
    with pytest.raises(UnavailableError):
        plan.throw(RESET)


# ---- streamed plans (generate, export) -------------------------------------------------


def test_a_stream_that_failed_before_its_first_message_moves_on() -> None:
    client = Client()
    plan = session(client)._export(0)
    assert next(plan) == Start("a:1", "ExportSession", calls.export("s", 0).request, True)
    assert plan.send(Stream()) == Read(plan.gi_frame.f_locals["responses"])
    assert isinstance(plan.throw(RESET), Pause)
    assert plan.send(None).stub == "b:2"  # the export starts over elsewhere
    assert isinstance(plan.send(Stream()), Read)
    assert plan.send(pb.ExportChunk(data=b"x")) == Deliver(b"x")
    assert isinstance(plan.send(None), Read)
    with pytest.raises(StopIteration):
        plan.send(END)
    assert client.replicas.pick()[0] == "b:2"


def test_a_stream_that_delivered_is_not_started_again() -> None:
    plan = session(Client())._export(0)
    next(plan)
    plan.send(Stream())
    assert plan.send(pb.ExportChunk(data=b"x")) == Deliver(b"x")
    plan.send(None)
    with pytest.raises(UnavailableError):
        plan.throw(RESET)  # idempotent, but the caller has the first chunk already


def test_generate_follows_redirects_but_never_resends_a_prompt() -> None:
    plan = session(Client())._generate("go", {"max_new_tokens": 2})
    next(plan)
    plan.send(Stream())
    assert plan.throw(moved("c:3")).stub == "c:3"  # refused unseen: nothing was appended
    plan.send(Stream())
    with pytest.raises(UnavailableError):
        plan.throw(RESET)  # the prompt may have been appended


def test_steps_throw_failures_in_and_cancel_the_streams_they_opened() -> None:
    opened = Stream()
    with Steps(session(Client())._export(0)) as steps:
        for step in steps:
            if isinstance(step, Start):
                steps.reply(step, opened)
            elif isinstance(step, Read):
                steps.reply(step, Failed(Refusal(Code.NOT_FOUND, "gone")))
                with pytest.raises(NotFoundError):
                    next(iter(steps))
                break
    assert opened.cancelled


# ---- the append stream ------------------------------------------------------------------


def _opened(position: int) -> pb.StreamResponse:
    return pb.StreamResponse(opened=pb.Session(session_id="s", position=position))


def test_a_resumed_append_stream_acknowledges_what_the_owner_holds_and_resends_the_rest() -> None:
    client = Client()
    handle = session(client, position=5)
    stream = AppendStream(handle, window=4)
    attempts: list[Any] = []
    plan = stream.plan(lambda attempt: attempts.append(attempt) or attempt, lambda: None)
    assert next(plan).stub == "a:1"
    assert isinstance(plan.send(Stream()), Read)
    assert plan.send(_opened(5)) == Read(plan.gi_frame.f_locals["responses"])
    first, _ = (stream.take(attempts[0], pb.Input(token_ids=[1] * n)) for n in (3, 2))
    assert not first.append.HasField("expected_position")  # not resumed yet
    assert isinstance(plan.throw(RESET), Pause) and attempts[0].ended
    assert plan.send(None).stub == "b:2"
    plan.send(Stream())
    # The next owner holds the first piece and one token of the second.
    assert plan.send(_opened(9)) == Deliver(pb.AppendAck(position=8, appended=3))
    assert attempts[1].opened and handle.position == 8
    (resend,) = stream.resends(attempts[1])
    assert resend.append.expected_position == 9 and list(resend.append.token_ids) == [1]


def test_a_piece_pulled_by_an_ended_attempt_is_carried_to_the_next() -> None:
    stream = AppendStream(session(Client()), window=1)
    plan = stream.plan(lambda attempt: attempt, lambda: None)
    ended = next(plan).request
    ended.ended = True
    piece = pb.Input(text=b"x")
    assert stream.take(ended, piece) is None and not stream.wants_piece(ended)
    assert stream.carried_piece() == piece and stream.carried_piece() is None


def test_the_window_bounds_what_is_unacknowledged_and_the_end_is_remembered() -> None:
    stream = AppendStream(session(Client()), window=1)
    plan = stream.plan(lambda attempt: attempt, lambda: None)
    attempt = next(plan).request
    plan.send(Stream())
    plan.send(_opened(0))
    assert stream.may_send(attempt)
    stream.take(attempt, pb.Input(text=b"x"))
    assert not stream.may_send(attempt)
    assert plan.send(pb.StreamResponse(ack=pb.AppendAck(position=1, appended=1))) == Deliver(
        pb.AppendAck(position=1, appended=1)
    )
    assert stream.may_send(attempt) and stream.take(attempt, None) is None
    assert not stream.wants_piece(attempt) and stream.may_send(attempt)


def test_a_failure_of_the_append_stream_that_is_final_raises_its_typed_error() -> None:
    stream = AppendStream(session(Client()), window=1)
    plan = stream.plan(lambda attempt: attempt, lambda: None)
    next(plan)
    plan.send(Stream())
    with pytest.raises(FailedPreconditionError):
        plan.throw(Refusal(Code.FAILED_PRECONDITION, "another writer"))


def test_steps_keep_no_stream_that_failed_to_start() -> None:
    with Steps(session(Client())._export(0)) as steps:
        step = next(iter(steps))
        steps.reply(step, Failed(Refusal(Code.PERMISSION_DENIED, "no")))
        with pytest.raises(MemsvcError, match="no"):
            next(iter(steps))
    # Leaving the block cancelled nothing (a Failed has no cancel()).
