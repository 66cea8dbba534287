"""Plans: each call of the SDK as a generator of steps, so that the retry and failover
logic is written once and the two SDKs only carry the steps out (blocking or awaiting).

A plan yields a step and is sent the step's outcome (or has the step's gRPC error
thrown into it): `Start` a call and get its answer (a unary call) or its response
stream; `Read` the next message of a response stream (`END` after the last);
`Pause`; `Deliver` an item to the caller. `Steps` runs a plan: the driver loops
over it, waits for each step, and hands the outcome back.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from memsvc.client.core.calls import Call, Unpacker, Upload
from memsvc.client.core.failover import Failover
from memsvc.client.core.routing import Replicas, position_hint
from memsvc.client.errors import from_rpc_error

T = TypeVar("T")


@dataclass(frozen=True)
class Start:
    """Call ``method`` on ``stub``: its answer (streaming: its response stream)."""

    stub: Any
    method: str
    request: Any
    streaming: bool = False


@dataclass(frozen=True)
class Read:
    """The next message of a response stream, or END."""

    responses: Any


@dataclass(frozen=True)
class Pause:
    seconds: float


@dataclass(frozen=True)
class Deliver:
    """An item for the caller (the driver yields it; the plan goes on when asked)."""

    item: Any


@dataclass(frozen=True)
class Failed:
    """A step's gRPC error, as its outcome (a response stream is an RpcError too)."""

    error: grpc.RpcError


END = object()  # a response stream ended (the outcome of a `Read`)
Step = Start | Read | Pause | Deliver
Plan = Generator[Step, Any, T]


def unary(call: Call, replicas: Replicas, failover: Failover) -> Plan[Any]:
    """One answer, from the session's owner, following redirects and failover."""
    request = call.request
    while True:
        address, (_, stub) = replicas.pick(call.session_id)
        try:
            answer = yield Start(stub, call.method, request)
        except grpc.RpcError as error:
            position = position_hint(error)
            if failover.resent and call.on_conflict is not None and position is not None:
                return call.on_conflict(position)
            spent = isinstance(request, Upload) and request.taken
            delay = failover.after(address, error, spent=spent)
            if delay is None:
                raise from_rpc_error(error) from None
            if failover.resent and call.resend is not None:
                request = call.resend
            if delay:  # 0: a redirect, followed at once
                yield Pause(delay)
            continue
        replicas.worked(address)
        return answer


def answered(plan: Plan[T]) -> Plan[None]:
    """``plan``, delivering what it returns."""
    yield Deliver((yield from plan))


def streamed(
    call: Call, replicas: Replicas, failover: Failover, unpacker: Unpacker[T]
) -> Plan[None]:
    """A response stream's items as they come. Failover as `unary` until a message has
    come: then a failure is final (a second stream would deliver the items again)."""
    while True:
        address, (_, stub) = replicas.pick(call.session_id)
        received = False
        try:
            responses = yield Start(stub, call.method, call.request, streaming=True)
            while (message := (yield Read(responses))) is not END:
                received = True
                for item in unpacker.feed(message):
                    yield Deliver(item)
        except grpc.RpcError as error:
            delay = failover.after(address, error, spent=received)
            if delay is None:
                raise from_rpc_error(error) from None
            if delay:  # 0: a redirect, followed at once
                yield Pause(delay)
            continue
        replicas.worked(address)
        for item in unpacker.flush():
            yield Deliver(item)
        return


@dataclass
class Steps:
    """Runs a plan for a driver: iterate for the steps, `reply` each one's outcome (a
    `Failed` is thrown into the plan). On exit, the response streams the plan started
    are cancelled (the caller may stop reading early)."""

    plan: Plan[Any]
    _outcome: Any = None
    _streams: list[Any] = field(default_factory=list)

    def __iter__(self) -> Iterator[Step]:
        while True:
            outcome, self._outcome = self._outcome, None
            try:
                if isinstance(outcome, Failed):
                    step = self.plan.throw(outcome.error)
                else:
                    step = self.plan.send(outcome)
            except StopIteration:
                return
            yield step

    def reply(self, step: Step, outcome: Any) -> None:
        if isinstance(step, Start) and step.streaming and not isinstance(outcome, Failed):
            self._streams.append(outcome)
        self._outcome = outcome

    def __enter__(self) -> Steps:
        return self

    def __exit__(self, *exc: object) -> None:
        for responses in self._streams:
            responses.cancel()
        self.plan.close()
