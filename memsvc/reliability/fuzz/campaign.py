"""The campaign: generated calls sent to a running server, each answer checked (a clean
status, no hang, the server alive, the sentinel session unchanged, a created session
still working); `fuzz_rpc` for one group, `run_bad_input_campaign` for all."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, Verbosity, example, given, settings
from hypothesis import seed as hypothesis_seed

from memsvc.proto.v1 import memsvc_pb2 as pb
from memsvc.proto.v1 import memsvc_pb2_grpc as pb_grpc
from memsvc.reliability.fuzz.calls import (
    CHANNEL_OPTIONS,
    CLEAN_CODES,
    GROUPS,
    HANG_S,
    Code,
    Credentials,
    FuzzCall,
    Outcome,
    bearer,
    send,
    unsigned_call,
)
from memsvc.reliability.fuzz.strategies import Targets, call_strategies, regression_calls
from memsvc.sessions.checkpoint import decode_checkpoint

_SENTINEL_TEXT = b"The sentinel: no generated request names this session. " * 4
_TARGET_TEXT = b"The target: generated requests append to it, fork it, evict it. " * 4
_SENTINEL_CHANGED = "the sentinel session changed"
_CREATORS = (
    "MemoryService/CreateSession",
    "MemoryService/ImportSession",
    "MemoryService/ForkSession",
)


def server_alive(channel: grpc.Channel, timeout_s: float = 10.0) -> bool:
    """Whether the server answers its health check with SERVING."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        answer = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
    except grpc.RpcError:
        return False
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def session_snapshot(channel: grpc.Channel, api_key: str, session_id: str) -> tuple[int, str]:
    """A session's position and the checksum of its export, which covers every tensor and
    counter of its state."""
    stub = pb_grpc.MemoryServiceStub(channel)
    position = stub.GetSession(
        pb.GetSessionRequest(session_id=session_id), metadata=bearer(api_key), timeout=HANG_S
    ).position
    export = export_session(channel, api_key, session_id)
    return position, decode_checkpoint(export, source=Path("<export>")).header.checksum


def export_session(channel: grpc.Channel, api_key: str, session_id: str) -> bytes:
    """The session's export, whole."""
    chunks = pb_grpc.MemoryServiceStub(channel).ExportSession(
        pb.ExportSessionRequest(session_id=session_id), metadata=bearer(api_key), timeout=HANG_S
    )
    return b"".join(chunk.data for chunk in chunks)


def create_session(channel: grpc.Channel, api_key: str, name: str, text: bytes) -> str:
    """A new session of the key's tenant holding ``text``."""
    stub = pb_grpc.MemoryServiceStub(channel)
    session = stub.CreateSession(
        pb.CreateSessionRequest(name=name), metadata=bearer(api_key), timeout=HANG_S
    )
    append = pb.AppendRequest(session_id=session.session_id, input=pb.Input(text=text))
    stub.Append(append, metadata=bearer(api_key), timeout=HANG_S)
    return session.session_id


def _delete_quietly(channel: grpc.Channel, api_key: str, session_id: str) -> None:
    request = pb.DeleteSessionRequest(session_id=session_id)
    with contextlib.suppress(grpc.RpcError):  # already gone
        pb_grpc.MemoryServiceStub(channel).DeleteSession(
            request, metadata=bearer(api_key), timeout=HANG_S
        )


def _exercise(channel: grpc.Channel, api_key: str, session_id: str) -> list[tuple[str, Outcome]]:
    """A session a call created, used once each way; the answers."""
    key = Credentials("tenant key", bearer(api_key))
    prompt = pb.Prompt(
        input=pb.Input(text=b"?"), params=pb.SamplingParams(temperature=0, max_new_tokens=1)
    )
    calls = [
        unsigned_call(
            "MemoryService/Append", pb.AppendRequest(session_id=session_id, input=prompt.input)
        ),
        unsigned_call("MemoryService/Query", pb.QueryRequest(session_id=session_id, prompt=prompt)),
        unsigned_call("MemoryService/Checkpoint", pb.CheckpointRequest(session_id=session_id)),
        unsigned_call(
            "MemoryService/ExportSession", pb.ExportSessionRequest(session_id=session_id)
        ),
        unsigned_call(
            "MemoryService/DeleteSession", pb.DeleteSessionRequest(session_id=session_id)
        ),
    ]
    return [(c.rpc, send(channel, replace(c, credentials=key))) for c in calls]


@dataclass(frozen=True)
class Failure:
    rpc: str  # the group
    code: str
    problem: str
    call: str  # repr of the FuzzCall


@dataclass
class GroupReport:
    """What one group's examples were answered with, and what went wrong."""

    group: str
    codes: Counter[str] = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)

    @property
    def examples(self) -> int:
        return sum(self.codes.values())


class BadAnswerError(AssertionError):
    """A generated call was answered badly (raised to make hypothesis shrink it)."""


def check_call(
    channel: grpc.Channel,
    targets: Targets,
    call: FuzzCall,
    clean: frozenset[Code] = CLEAN_CODES,
    hang_s: float = HANG_S,
) -> tuple[Outcome, list[str]]:
    """Sends the call; its outcome and the problems found: a status outside ``clean`` (for the
    call), a server that stopped answering, a session it created that then fails."""
    outcome = send(channel, call, hang_s)
    problems = []
    if outcome.code not in call.allowed(clean):
        problems.append(f"answered {outcome.code.name}: {outcome.details}")
    if outcome.created is not None and call.rpc in _CREATORS:
        for rpc, after in _exercise(channel, targets.api_key, outcome.created):
            if after.code not in CLEAN_CODES:
                problems.append(
                    f"the session it created answers {rpc} with {after.code.name}: {after.details}"
                )
        _delete_quietly(channel, targets.api_key, outcome.created)
    if not server_alive(channel):
        problems.append("the server stopped answering its health check")
    return outcome, problems


def fuzz_rpc(
    channel: grpc.Channel,
    targets: Targets,
    group: str,
    *,
    examples: int,
    seed: int,
    clean: frozenset[Code] = CLEAN_CODES,
    shrink: bool = False,
    hang_s: float = HANG_S,
) -> GroupReport:
    """Sends ``examples`` generated calls of ``group`` (one of GROUPS) and checks each
    (``check_call``). With ``shrink``, the first failure raises BadAnswerError after
    hypothesis has shrunk it to a minimal call; without, every failure is recorded."""
    report = GroupReport(group)
    strategies = call_strategies(targets)
    if group not in strategies:
        raise ValueError(f"no request strategy for {group}: give its RPC one in this module")
    strategy = strategies[group]

    def run_one(call: FuzzCall) -> None:
        outcome, problems = check_call(channel, targets, call, clean, hang_s)
        report.codes[outcome.code.name] += 1
        if problems:
            report.failures.append(
                Failure(group, outcome.code.name, "; ".join(problems), repr(call))
            )
            if shrink:
                raise BadAnswerError(f"{call!r}: {'; '.join(problems)}")

    run = given(strategy)(run_one)
    for call in regression_calls(targets).get(group, ()):
        run = example(call)(run)
    settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=tuple(Phase) if shrink else (Phase.explicit, Phase.generate),
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.normal if shrink else Verbosity.quiet,
        print_blob=False,
    )(hypothesis_seed(seed)(run))()
    return report


def run_bad_input_campaign(
    address: str,
    api_key: str,
    admin_key: str,
    *,
    examples: int,
    seed: int,
    groups: Sequence[str] = GROUPS,
    clean: frozenset[Code] = CLEAN_CODES,
    hang_s: float = HANG_S,
) -> dict[str, Any]:
    """Sends ``examples`` generated calls of each group (default: every RPC, and every RPC
    with undecodable bodies) to the server at ``address``, as the tenant of ``api_key``.

    Two sessions of the tenant are created first: a target that calls may name
    (remade whenever a call deleted it) and a sentinel that none names. The
    report: per group, how many calls were answered with each status; the
    failures (a status outside ``clean``, a hang, a server that stopped
    answering, a created session that then failed, the sentinel changed), each
    with the call's repr; whether the server is alive and the sentinel unchanged
    at the end; the elapsed seconds. The two sessions are deleted at the end.
    """
    started = time.perf_counter()
    reports: list[GroupReport] = []
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        sentinel = create_session(channel, api_key, "fuzz-sentinel", _SENTINEL_TEXT)
        target = create_session(channel, api_key, "fuzz-target", _TARGET_TEXT)
        try:
            before = session_snapshot(channel, api_key, sentinel)
            for number, group in enumerate(groups):
                if not _exists(channel, api_key, target):
                    target = create_session(channel, api_key, "fuzz-target", _TARGET_TEXT)
                targets = Targets(
                    api_key, admin_key, (target,), export_session(channel, api_key, target)
                )
                report = fuzz_rpc(
                    channel,
                    targets,
                    group,
                    examples=examples,
                    seed=seed + number,
                    clean=clean,
                    hang_s=hang_s,
                )
                after = session_snapshot(channel, api_key, sentinel)
                if after != before:
                    problem = f"{_SENTINEL_CHANGED}: {before} -> {after}"
                    report.failures.append(
                        Failure(group, "", problem, "(one of the group's calls)")
                    )
                    before = after
                reports.append(report)
            alive = server_alive(channel)
        finally:
            for session_id in (target, sentinel):
                _delete_quietly(channel, api_key, session_id)
    failures = [f for r in reports for f in r.failures]
    return {
        "examples": examples,
        "seed": seed,
        "elapsed_s": round(time.perf_counter() - started, 3),
        "per_rpc": {
            r.group: {"examples": r.examples, "codes": dict(r.codes), "failures": len(r.failures)}
            for r in reports
        },
        "failures": [asdict(f) for f in failures],
        "server_alive": alive,
        "sentinel_unchanged": not any(f.problem.startswith(_SENTINEL_CHANGED) for f in failures),
    }


def _exists(channel: grpc.Channel, api_key: str, session_id: str) -> bool:
    try:
        pb_grpc.MemoryServiceStub(channel).GetSession(
            pb.GetSessionRequest(session_id=session_id), metadata=bearer(api_key), timeout=HANG_S
        )
    except grpc.RpcError as error:
        if error.code() == Code.NOT_FOUND:
            return False
        raise
    return True
