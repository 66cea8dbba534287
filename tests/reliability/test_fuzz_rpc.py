"""Generated bad requests over real gRPC (``memsvc.reliability.fuzz``): every call of every
RPC, and every undecodable body, is answered with a status that names the mistake; the
server keeps answering; and sessions no call named do not change.

Each group (an RPC, or an RPC with ``:raw`` bodies) gets its own hypothesis run against
the module's server: its regression calls, then generated ones; a failing run lists each
distinct problem with the shortest call that showed it. The campaign the benchmark runs
is exercised whole, once, with a few calls per group. The last tests
hold the checks to account: a wrong expectation must be flagged, a changed session must
look changed, and a server that is gone must look gone.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from memsvc.proto.v1 import memsvc_pb2 as pb
from memsvc.reliability.fuzz.calls import CLEAN_CODES, GROUPS, Credentials, FuzzCall, bearer
from memsvc.reliability.fuzz.campaign import (
    BadAnswerError,
    Failure,
    check_call,
    create_session,
    export_session,
    fuzz_rpc,
    run_bad_input_campaign,
    server_alive,
    session_snapshot,
)
from memsvc.reliability.fuzz.strategies import Targets
from tests.server.harness import ADMIN_KEY, Service

Code = grpc.StatusCode
EXAMPLES = 20  # calls per group, before any shrinking


@dataclass(frozen=True)
class Bystander:
    """A session of bob's (every generated call is alice's or the operator's)."""

    api_key: str
    session_id: str
    snapshot: tuple[int, str]  # position, export checksum

    def unchanged(self, channel: grpc.Channel) -> bool:
        return session_snapshot(channel, self.api_key, self.session_id) == self.snapshot


@pytest.fixture(scope="module")
def bystander(server: Service, channel: grpc.Channel) -> Bystander:
    key = server.bob.api_key
    session_id = create_session(channel, key, "bystander", b"Bob's memory. " * 8)
    return Bystander(key, session_id, session_snapshot(channel, key, session_id))


def _alice_sessions(server: Service) -> list[str]:
    listed = server.stub.ListSessions(pb.ListSessionsRequest(), metadata=server.alice.metadata)
    return [session.session_id for session in listed.sessions]


@pytest.fixture
def targets(server: Service, channel: grpc.Channel) -> Iterator[Targets]:
    """A fresh session of alice's for the calls to name, and a valid export to damage;
    afterwards every session of alice's is deleted."""
    key = server.alice.api_key
    session_id = create_session(channel, key, "target", b"Alice's memory, fuzzed. " * 8)
    yield Targets(key, ADMIN_KEY, (session_id,), export_session(channel, key, session_id))
    for session_id in _alice_sessions(server):
        server.stub.DeleteSession(
            pb.DeleteSessionRequest(session_id=session_id), metadata=bearer(key)
        )


def _listing(failures: list[Failure]) -> str:
    """Each distinct problem once, with the shortest call that showed it."""
    shortest: dict[str, str] = {}
    for failure in sorted(failures, key=lambda f: len(f.call)):
        shortest.setdefault(failure.problem, f"{failure.problem}\n    {failure.call}")
    return f"{len(failures)} calls failed; distinct problems:\n" + "\n".join(shortest.values())


@pytest.mark.parametrize("group", GROUPS)
def test_generated_calls_are_answered_cleanly(
    channel: grpc.Channel, targets: Targets, bystander: Bystander, group: str
) -> None:
    seed = zlib.crc32(group.encode())
    report = fuzz_rpc(channel, targets, group, examples=EXAMPLES, seed=seed)
    assert report.examples >= EXAMPLES // 2
    if report.failures:
        pytest.fail(_listing(report.failures))
    assert bystander.unchanged(channel)


def test_the_campaign_covers_every_group_and_finds_nothing(
    server: Service, channel: grpc.Channel, bystander: Bystander
) -> None:
    before = _alice_sessions(server)
    report = run_bad_input_campaign(
        server.address, server.alice.api_key, ADMIN_KEY, examples=3, seed=7
    )
    assert set(report["per_rpc"]) == set(GROUPS)
    assert all(group["examples"] > 0 for group in report["per_rpc"].values())
    assert report["server_alive"]
    assert report["sentinel_unchanged"]
    if report["failures"]:
        pytest.fail(_listing([Failure(**failure) for failure in report["failures"]]))
    assert _alice_sessions(server) == before, "the campaign left sessions behind"
    assert bystander.unchanged(channel)


# ---- the checks themselves -----------------------------------------------------------------


def test_an_answer_outside_the_expected_set_is_flagged(
    channel: grpc.Channel, targets: Targets
) -> None:
    empty = pb.AppendRequest(session_id=targets.session_ids[0], input=pb.Input())
    call = FuzzCall(
        "MemoryService/Append", (empty,), Credentials("tenant key", bearer(targets.api_key))
    )
    outcome, problems = check_call(channel, targets, call)
    assert outcome.code == Code.INVALID_ARGUMENT
    assert problems == []
    outcome, problems = check_call(channel, targets, call, clean=frozenset({Code.OK}))
    assert problems == [f"answered INVALID_ARGUMENT: {outcome.details}"]


def test_a_wrong_expectation_fails_the_run_and_the_campaign(
    server: Service, channel: grpc.Channel, targets: Targets
) -> None:
    # Some generated GetSession calls name no session, or carry a bad key: not OK.
    only_ok = frozenset({Code.OK})
    with pytest.raises(BadAnswerError):
        fuzz_rpc(
            channel,
            targets,
            "MemoryService/GetSession",
            examples=20,
            seed=0,
            clean=only_ok,
            shrink=True,
        )
    report = run_bad_input_campaign(
        server.address,
        server.alice.api_key,
        ADMIN_KEY,
        examples=20,
        seed=0,
        groups=["MemoryService/GetSession"],
        clean=only_ok,
    )
    assert report["failures"]
    # Flagged only for the narrowed expectation: each is a clean refusal.
    assert {f["code"] for f in report["failures"]} <= {c.name for c in CLEAN_CODES - only_ok}


def test_a_changed_session_looks_changed(
    server: Service, channel: grpc.Channel, targets: Targets
) -> None:
    session_id = targets.session_ids[0]
    before = session_snapshot(channel, targets.api_key, session_id)
    append = pb.AppendRequest(session_id=session_id, input=pb.Input(token_ids=[1]))
    server.stub.Append(append, metadata=bearer(targets.api_key))
    after = session_snapshot(channel, targets.api_key, session_id)
    assert after[0] == before[0] + 1
    assert after[1] != before[1]


def test_a_server_that_is_gone_is_not_alive(channel: grpc.Channel) -> None:
    assert server_alive(channel)
    with grpc.insecure_channel("127.0.0.1:1") as nowhere:
        assert not server_alive(nowhere, timeout_s=1.0)


# ---- on PostgreSQL -------------------------------------------------------------------------


def test_the_campaign_finds_nothing_on_postgresql(tmp_path, engine, postgres_url: str) -> None:
    """The same campaign over PostgreSQL, which refuses values SQLite stores (NUL in text)."""
    from memsvc.server.app import ServerConfig
    from memsvc.sessions.manager import ManagerConfig, SessionManager
    from memsvc.store import migrate
    from memsvc.store.database import Database
    from memsvc.store.hot_state import InProcessHotStateTracker
    from tests.server.harness import ServerThread, create_tenant

    migrate.upgrade(postgres_url)
    database = Database.from_url(postgres_url)
    manager = SessionManager(
        ManagerConfig(data_dir=tmp_path / "data"),
        engine=engine,
        database=database,
        tracker=InProcessHotStateTracker(),
    )
    config = ServerConfig(address="127.0.0.1:0", admin_key=ADMIN_KEY, shutdown_grace_s=5.0)
    thread = ServerThread(manager, database, config).start()
    try:
        tenant = create_tenant(database, "fuzz-pg")
        report = run_bad_input_campaign(
            thread.address, tenant.api_key, ADMIN_KEY, examples=2, seed=11
        )
    finally:
        thread.stop()
        database.dispose()
    assert report["server_alive"] and report["sentinel_unchanged"]
    if report["failures"]:
        pytest.fail(_listing([Failure(**failure) for failure in report["failures"]]))
