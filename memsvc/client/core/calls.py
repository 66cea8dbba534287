"""Each SDK call as a `Call`: its method, its request, where it goes and whether it may
be repeated; and what a streamed answer gives the caller.

The one place a request is built, so that the two SDKs cannot send different ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from memsvc.client.errors import FailedPreconditionError
from memsvc.client.messages import Data, TextDecoder, input_message, prompt_message
from memsvc.proto.v1 import memsvc_pb2 as pb

T = TypeVar("T")


@dataclass(frozen=True)
class Call:
    """One RPC of MemoryService as the SDK makes it.

    session_id: the call goes to the session's owner (None: any replica).
    idempotent: repeating it when its outcome is unknown is harmless.
    resend: the request to send instead once the outcome is unknown (a conditional
    form of it), and on_conflict(position) what a conflict it meets means.
    """

    method: str
    request: Any
    session_id: str | None = None
    idempotent: bool = False
    resend: Any = None
    on_conflict: Callable[[int], Any] | None = None

    @property
    def resendable(self) -> bool:
        return self.idempotent or self.resend is not None


def create_session(name: str) -> Call:
    return Call("CreateSession", pb.CreateSessionRequest(name=name))


def get_session(session_id: str, *, routed: bool) -> Call:
    """routed: ask the session's owner (its latest position), else any replica."""
    request = pb.GetSessionRequest(session_id=session_id)
    return Call("GetSession", request, session_id if routed else None, idempotent=True)


def list_sessions() -> Call:
    return Call("ListSessions", pb.ListSessionsRequest(), idempotent=True)


def delete_session(session_id: str) -> Call:
    return Call("DeleteSession", pb.DeleteSessionRequest(session_id=session_id), session_id)


def checkpoint(session_id: str) -> Call:
    request = pb.CheckpointRequest(session_id=session_id)
    return Call("Checkpoint", request, session_id, idempotent=True)


def fork(session_id: str, name: str) -> Call:
    return Call("ForkSession", pb.ForkSessionRequest(session_id=session_id, name=name), session_id)


def query(session_id: str, prompt: Data, sampling: dict[str, Any]) -> Call:
    request = pb.QueryRequest(session_id=session_id, prompt=prompt_message(prompt, sampling))
    return Call("Query", request, session_id, idempotent=True)


def generate(session_id: str, prompt: Data, sampling: dict[str, Any]) -> Call:
    """Not resendable: the prompt and output are appended, and a prompt takes no
    expected position."""
    request = pb.GenerateRequest(session_id=session_id, prompt=prompt_message(prompt, sampling))
    return Call("Generate", request, session_id)


def export(session_id: str, chunk_bytes: int) -> Call:
    request = pb.ExportSessionRequest(session_id=session_id, chunk_bytes=chunk_bytes)
    return Call("ExportSession", request, session_id, idempotent=True)


@dataclass
class Upload:
    """A client-streamed request: ``first``, then each of the caller's ``items`` as
    ``take(item)``. Once an item was taken the call cannot be made again (the caller
    cannot give it twice): ``taken`` says so."""

    first: Any
    wrap: Callable[[Any], Any]
    items: Any  # Iterable, or AsyncIterable for the asyncio SDK
    taken: bool = False

    def take(self, item: Any) -> Any:
        self.taken = True
        return self.wrap(item)


def import_session(name: str, chunks: Any) -> Call:
    """A new session from an export's bytes (``chunks``, iterable or async iterable)."""
    header = pb.ImportSessionRequest(header=pb.ImportHeader(name=name))
    wrap = lambda data: pb.ImportSessionRequest(data=data)  # noqa: E731
    return Call("ImportSession", Upload(header, wrap, chunks))


def token_ids(message: pb.Input) -> list[int]:
    """The ids the server appends for ``message`` (text: its bytes)."""
    return list(message.token_ids) if message.token_ids else list(message.text)


def conditional(message: pb.Input, start: int) -> pb.Input:
    """``message`` applied only if the stream is at ``start``."""
    copy = pb.Input()
    copy.CopyFrom(message)
    copy.expected_position = start
    return copy


def append(session_id: str, data: Data, start: int) -> Call:
    """An append whose resend (its outcome unknown) applies only at ``start``; a conflict
    on the resend means applied already if the stream is exactly past it (an
    acknowledgement), else FailedPreconditionError (another writer)."""
    message = input_message(data)
    count = len(token_ids(message))

    def applied_before(position: int) -> pb.AppendAck:
        if position != start + count:
            raise FailedPreconditionError(
                f"session {session_id} is at position {position}: the append resent after "
                f"a failure expected {start} (another writer?)"
            )
        return pb.AppendAck(position=position, appended=count)

    return Call(
        "Append",
        pb.AppendRequest(session_id=session_id, input=message),
        session_id,
        resend=pb.AppendRequest(session_id=session_id, input=conditional(message, start)),
        on_conflict=applied_before,
    )


class Unpacker(Protocol[T]):
    """What a streamed answer's messages give the caller, message by message."""

    def feed(self, message: Any) -> list[T]: ...

    def flush(self) -> list[T]: ...


class GeneratedText:
    """`Generate`'s messages as text (a character split across messages waits)."""

    def __init__(self) -> None:
        self._decoder = TextDecoder()

    def feed(self, message: pb.GeneratedTokens) -> list[str]:
        text = self._decoder.feed(message.token_ids)
        return [text] if text else []

    def flush(self) -> list[str]:
        text = self._decoder.flush()
        return [text] if text else []


class ExportedBytes:
    """`ExportSession`'s messages as their bytes."""

    def feed(self, message: pb.ExportChunk) -> list[bytes]:
        return [message.data]

    def flush(self) -> list[bytes]:
        return []
