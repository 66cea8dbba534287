"""The RPCs the campaign calls, one generated call (`FuzzCall`), sending it and reading
its answer, and the statuses a bad request may be answered with. No hypothesis here."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import grpc
from google.protobuf.message import Message

from memsvc.proto.v1 import memsvc_pb2 as pb

Code = grpc.StatusCode

# What a bad request may be answered with: each code names the caller's mistake
# (memsvc.proto's error table). UNKNOWN and INTERNAL are bugs; ABORTED (a
# quarantined session), UNAVAILABLE (a dying server) and DEADLINE_EXCEEDED (a
# hang, unless the call set a short deadline of its own) are damage.
CLEAN_CODES: frozenset[Code] = frozenset(
    {
        Code.OK,
        Code.INVALID_ARGUMENT,
        Code.NOT_FOUND,
        Code.RESOURCE_EXHAUSTED,
        Code.FAILED_PRECONDITION,
        Code.UNAUTHENTICATED,
        Code.PERMISSION_DENIED,
    }
)
# A call without a deadline of its own gets this long before it counts as a hang.
HANG_S = 60.0
# The campaign's own channel sends and receives whatever the server allows.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
]


# ---- the RPCs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One RPC as a generic channel call sees it."""

    path: str  # "/memsvc.v1.MemoryService/Append"
    request: type[Message]
    response: type[Message]
    client_streaming: bool
    server_streaming: bool

    def multi_callable(self, channel: grpc.Channel, raw: bool) -> Callable[..., Any]:
        """The channel's multi-callable; ``raw`` sends each request as the bytes it is."""
        kind = f"{'stream' if self.client_streaming else 'unary'}_" + (
            "stream" if self.server_streaming else "unary"
        )
        serialize = None if raw else self.request.SerializeToString
        return getattr(channel, kind)(
            self.path, request_serializer=serialize, response_deserializer=self.response.FromString
        )


METHODS: dict[str, Method] = {
    f"{service.name}/{method.name}": Method(
        f"/{service.full_name}/{method.name}",
        getattr(pb, method.input_type.name),
        getattr(pb, method.output_type.name),
        method.client_streaming,
        method.server_streaming,
    )
    for service in pb.DESCRIPTOR.services_by_name.values()
    for method in service.methods
}
# Every RPC, then every RPC with undecodable bodies.
GROUPS: tuple[str, ...] = (*METHODS, *(f"{rpc}:raw" for rpc in METHODS))


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    """The metadata that authenticates a call with ``key``."""
    return (("authorization", f"Bearer {key}"),)


def pretty_as_repr(self: Any, printer: Any, cycle: bool) -> None:
    """Hypothesis prints a dataclass field by field; these print as their (short) repr."""
    printer.text(repr(self))


class Credentials(NamedTuple):
    """Call metadata, and what it is in words (reports never show a real key)."""

    label: str
    metadata: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class FuzzCall:
    """One generated call: its RPC, its requests (messages, or bytes sent undecoded), its
    credentials and deadline, and how its requests were made where their bytes do not say."""

    rpc: str  # a key of METHODS
    requests: tuple[Message | bytes, ...]  # exactly one for a unary request
    credentials: Credentials
    deadline_s: float | None = None  # a deadline of its own; None: the campaign's hang limit
    note: str = ""

    @property
    def raw(self) -> bool:
        return any(isinstance(request, bytes) for request in self.requests)

    def allowed(self, clean: frozenset[Code] = CLEAN_CODES) -> frozenset[Code]:
        """The answers that are not failures: a call with a deadline of its own may miss it."""
        return clean | {Code.DEADLINE_EXCEEDED} if self.deadline_s is not None else clean

    def __repr__(self) -> str:
        parts = [describe(request) for request in self.requests]
        parts.append(f"credentials={self.credentials.label}")
        if self.deadline_s is not None:
            parts.append(f"deadline_s={self.deadline_s}")
        if self.note:
            parts.append(f"note={self.note}")
        return f"{self.rpc}({', '.join(parts)})"

    _repr_pretty_ = pretty_as_repr


@dataclass(frozen=True)
class Outcome:
    code: Code
    details: str
    responses: tuple[Message, ...]

    @property
    def created(self) -> str | None:
        """The id of the session this answer says was created, if any."""
        last = self.responses[-1] if self.responses else None
        return last.session_id if isinstance(last, pb.Session) and last.session_id else None


def send(channel: grpc.Channel, call: FuzzCall, hang_s: float = HANG_S) -> Outcome:
    """Sends the call and reads every response; the status it ended with."""
    method = METHODS[call.rpc]
    invoke = method.multi_callable(channel, call.raw)
    request = iter(call.requests) if method.client_streaming else call.requests[0]
    timeout = call.deadline_s if call.deadline_s is not None else hang_s
    try:
        answer = invoke(request, metadata=call.credentials.metadata, timeout=timeout)
        responses = tuple(answer) if method.server_streaming else (answer,)
    except grpc.RpcError as error:
        return Outcome(error.code(), error.details() or "", ())
    return Outcome(Code.OK, "", responses)


def describe(value: Message | bytes) -> str:
    """A request as Python-ish text, long values shortened so that they can be rebuilt."""
    if isinstance(value, bytes):
        return short_repr(value)
    fields = []
    for descriptor, item in value.ListFields():
        if descriptor.message_type is not None and not descriptor.is_repeated:
            fields.append(f"{descriptor.name}={describe(item)}")
        else:
            fields.append(f"{descriptor.name}={short_repr(item)}")
    return f"{type(value).__name__}({', '.join(fields)})"


def short_repr(value: Any, keep: int = 48) -> str:
    """``repr`` of a field, a long one as runs (``b'[' * 9 + b']' * 9``) or cut."""
    if isinstance(value, bytes | str):
        if len(value) <= keep:
            return repr(value)
        runs = [(key, len(list(group))) for key, group in itertools.groupby(value)]
        if len(runs) <= 4:
            unit = (lambda c: bytes([c])) if isinstance(value, bytes) else (lambda c: c)
            return " + ".join(f"{unit(c)!r} * {n}" if n > 1 else repr(unit(c)) for c, n in runs)
        return f"{value[:keep]!r}...({len(value)} long)"
    if isinstance(value, Iterable) and not isinstance(value, Message):
        items = list(value)
        if len(items) > 8 and all(item == items[0] for item in items):
            return f"[{short_repr(items[0])}] * {len(items)}"
        shown = ", ".join(
            describe(i) if isinstance(i, Message) else short_repr(i) for i in items[:16]
        )
        return f"[{shown}]" if len(items) <= 16 else f"[{shown}, ...({len(items)} items)]"
    return repr(value)


def unsigned_call(rpc: str, *requests: Message) -> FuzzCall:
    """A call without credentials yet."""
    return FuzzCall(rpc, requests, Credentials("none", ()))
