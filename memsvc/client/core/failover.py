"""What a failed attempt means for its call: go again (now, or after a pause), or give up.

Every call of both SDKs, unary or streaming, asks one `Failover` after each
failed attempt, so they all follow redirects, skip dead replicas and wait out
a session's handover the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc

from memsvc.client.core.routing import Replicas, owner_hint
from memsvc.client.retry import RetryPolicy

# Redirects followed by one call before it backs off like a failure.
MAX_HOPS = 4
# What gRPC says when no connection could be made: the call never left the client.
_NOT_CONNECTED = ("failed to connect", "connection refused")


def not_sent(error: grpc.RpcError) -> bool:
    """Whether the call surely never reached a server (no connection could be made)."""
    details = (error.details() or "").lower()  # type: ignore[attr-defined]
    return error.code() == grpc.StatusCode.UNAVAILABLE and any(  # type: ignore[attr-defined]
        words in details for words in _NOT_CONNECTED
    )


class Failover:
    """One call's way through the replicas: after each failure, wait how long, or give up.

    ``resendable``: the call may be repeated when its outcome is unknown (it is
    idempotent, or the caller has a conditional form of it); a call that
    never reached a server (no connection) is always safe to repeat.
    Redirects to the owner are followed at once (``MAX_HOPS`` in a row);
    other failures wait per ``retry`` (RetryPolicy: its attempts and backoff)
    and end when its attempts or ``budget_s`` run out.
    """

    def __init__(
        self,
        replicas: Replicas,
        session_id: str | None,
        *,
        resendable: bool,
        retry: RetryPolicy,
        budget_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.replicas = replicas
        self.session_id = session_id
        self.resendable = resendable
        self._delays = retry.delays()
        self._clock = clock
        self._deadline = clock() + budget_s
        self._hops = 0
        self.resent = False  # a try came after one whose outcome is unknown

    def after(self, address: str, error: grpc.RpcError, *, spent: bool = False) -> float | None:
        """Seconds to wait before trying again (0: at once), or None: raise ``error``.

        spent: the attempt handed responses to the caller, or took input the caller
        cannot give again; repeating it would double or lose them, so it is final.
        """
        if spent or error.code() != grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
            return None
        owner = owner_hint(error)
        if owner and owner != address and self._hops < MAX_HOPS:
            self._hops += 1
            self.replicas.moved(self.session_id, owner)
            return 0.0
        self.replicas.failed(address)
        if owner is None and not not_sent(error):  # an owner hint: refused, not run
            if not self.resendable:
                return None
            self.resent = True
        delay = next(self._delays, None)
        if delay is None or self._clock() + delay > self._deadline:
            return None
        self._hops = 0
        return delay
