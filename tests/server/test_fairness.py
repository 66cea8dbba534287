"""Fair share between tenants: `FairShare` alone, then two tenants through real gRPC."""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from memsvc.proto.v1 import memsvc_pb2 as pb
from memsvc.server.fairness import SAMPLED_TOKEN_COST, FairShare
from tests.server.harness import Service


def test_the_least_served_tenant_goes_next_and_equal_costs_alternate() -> None:
    fair = FairShare()
    fair.wake(["a", "b"])
    order = []
    for _ in range(6):
        tenant = fair.next(["a", "b"])
        assert tenant is not None
        order.append(tenant)
        fair.charge(tenant, 64)
    assert order == ["a", "b", "a", "b", "a", "b"]


def test_a_sampled_token_counts_as_sixteen_appended_tokens() -> None:
    fair = FairShare()
    fair.wake(["gen", "app"])
    served = {"gen": 0, "app": 0}
    for _ in range(100):
        tenant = fair.next(["gen", "app"])
        assert tenant is not None
        cost = SAMPLED_TOKEN_COST if tenant == "gen" else 1
        fair.charge(tenant, cost)
        served[tenant] += 1
    assert abs(served["app"] - SAMPLED_TOKEN_COST * served["gen"]) <= SAMPLED_TOKEN_COST


def test_an_idle_tenant_banks_no_credit() -> None:
    fair = FairShare()
    fair.wake(["busy"])
    fair.charge("busy", 10_000)
    fair.wake(["busy", "back"])  # "back" was idle all along: it starts level with "busy"
    assert fair.served("back") == fair.served("busy") == 10_000
    fair.charge("back", 1)
    assert fair.next(["busy", "back"]) == "busy"


def _create(service: Service, metadata: tuple[tuple[str, str], ...]) -> str:
    return service.stub.CreateSession(pb.CreateSessionRequest(), metadata=metadata).session_id


def test_one_tenants_bulk_appends_do_not_starve_anothers_small_ones(service: Service) -> None:
    alice, bob = service.alice.metadata, service.bob.metadata
    bulk_sessions = [_create(service, alice) for _ in range(4)]
    bob_session = _create(service, bob)
    service.stub.Append(
        pb.AppendRequest(session_id=bob_session, input=pb.Input(text=b"warm")), metadata=bob
    )
    bulk_seconds: list[float] = []

    def bulk(session_id: str) -> None:
        for _ in range(8):  # about 2 s in all here, several times bob's eight appends
            started = time.monotonic()
            request = pb.AppendRequest(session_id=session_id, input=pb.Input(text=b"a" * 4096))
            service.stub.Append(request, metadata=alice, timeout=300)
            bulk_seconds.append(time.monotonic() - started)

    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(bulk, s) for s in bulk_sessions]
        time.sleep(0.3)  # the bulk appends are under way
        small_seconds = []
        for _ in range(8):
            started = time.monotonic()
            request = pb.AppendRequest(session_id=bob_session, input=pb.Input(text=b"b" * 64))
            service.stub.Append(request, metadata=bob, timeout=300)
            small_seconds.append(time.monotonic() - started)
        bob_finished_first = not all(f.done() for f in running)
        for future in running:
            future.result()
    assert bob_finished_first, "bob's small appends waited for alice's bulk to finish"
    # Alice's 4096-token appends take many steps; bob's take about one each.
    assert statistics.median(small_seconds) < statistics.median(bulk_seconds) / 3
