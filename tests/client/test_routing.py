"""How the SDK picks replicas and reacts to each kind of failure (the decisions of
core/routing.py and core/failover.py; tests/server/test_cluster.py runs them against
real replicas)."""

from __future__ import annotations

import grpc
import pytest

from memsvc.client.core.failover import MAX_HOPS, Failover
from memsvc.client.core.routing import (
    DOWN_FOR_S,
    Replicas,
    owner_hint,
    parse_addresses,
    position_hint,
)
from memsvc.client.retry import RetryPolicy

Code = grpc.StatusCode


class Refusal(grpc.RpcError):
    """An error as a gRPC call raises it: a status, details and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, details: str = "", **trailing: str) -> None:
        self._code, self._details = code, details
        self._trailing = tuple((k.replace("_", "-"), v) for k, v in trailing.items())

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailing


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_addresses_parse_from_a_list_or_a_comma_separated_string() -> None:
    assert parse_addresses("a:1, b:2,") == ["a:1", "b:2"]
    assert parse_addresses(["a:1"]) == ["a:1"]
    with pytest.raises(ValueError):
        parse_addresses(" , ")


def test_hints_are_read_only_from_their_status() -> None:
    moved = Refusal(Code.UNAVAILABLE, memsvc_owner="b:2")
    assert owner_hint(moved) == "b:2" and position_hint(moved) is None
    conflict = Refusal(Code.FAILED_PRECONDITION, memsvc_position="42")
    assert position_hint(conflict) == 42 and owner_hint(conflict) is None
    assert owner_hint(Refusal(Code.ABORTED, memsvc_owner="b:2")) is None


def test_replicas_prefer_the_owner_then_skip_what_is_down() -> None:
    clock = Clock()
    replicas = Replicas(["a:1", "b:2", "c:3"], lambda address: f"conn-{address}", clock)
    assert replicas.pick("s") == ("a:1", "conn-a:1")
    replicas.moved("s", "d:4")  # learnt from a redirect: a new replica
    assert replicas.pick("s")[0] == "d:4" and "d:4" in replicas.addresses
    assert replicas.pick("other")[0] == "a:1"
    replicas.failed("d:4")  # the owner died: forgotten as the owner
    replicas.failed("a:1")
    assert replicas.pick("s")[0] == "b:2"
    clock.now += DOWN_FOR_S
    replicas.worked("a:1")
    assert replicas.pick(None)[0] == "a:1"


def _failover(resendable: bool, attempts: int = 3) -> tuple[Failover, Replicas]:
    replicas = Replicas(["a:1", "b:2"], lambda address: address)
    retry = RetryPolicy(attempts=attempts, initial_backoff_s=0.01, max_backoff_s=0.01)
    return Failover(replicas, "s", resendable=resendable, retry=retry, budget_s=60), replicas


def test_redirects_are_followed_at_once_a_bounded_number_of_times() -> None:
    failover, replicas = _failover(resendable=False)
    moved = Refusal(Code.UNAVAILABLE, memsvc_owner="b:2")
    for _ in range(MAX_HOPS):
        assert failover.after("a:1", moved) == 0.0
    assert replicas.pick("s")[0] == "b:2" and not failover.resent
    # Past the limit: a pause first (the replicas disagree, e.g. while a lease moves); a
    # redirect means nothing was done, so even this non-resendable call may go again.
    assert failover.after("a:1", moved) > 0 and not failover.resent
    assert failover.after("a:1", moved) == 0.0


def test_an_unknown_outcome_is_retried_only_when_the_call_may_be_resent() -> None:
    reset = Refusal(Code.UNAVAILABLE, "Socket closed")
    failover, _ = _failover(resendable=False)
    assert failover.after("a:1", reset) is None
    failover, _ = _failover(resendable=True, attempts=3)
    assert 0 < failover.after("a:1", reset) <= 0.01 and failover.resent
    assert failover.after("b:2", reset) is not None
    assert failover.after("a:1", reset) is None  # attempts used up


def test_a_call_that_never_connected_is_retried_whatever_it_is() -> None:
    refused = Refusal(Code.UNAVAILABLE, "failed to connect to all addresses; Connection refused")
    failover, _ = _failover(resendable=False)
    assert failover.after("a:1", refused) is not None and not failover.resent


def test_other_statuses_are_not_retried() -> None:
    failover, _ = _failover(resendable=True)
    for code in (Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED):
        assert failover.after("a:1", Refusal(code)) is None
