"""`memsvc bench serve --neighbour`: one tenant's heavy work beside another's small appends.

Tenant B streams 64-token appends from 8 sessions (one append in flight per
session), first alone, then beside tenant A, which meanwhile generates
``--generate-tokens`` tokens (10k) in one stream and bulk-appends
``--bulk-tokens`` tokens (1M) in ``--bulk-append-tokens`` pieces to another
session. Reported: B's append latency p50 and p99 alone and beside A, and the
ratio of the p99s (goal: <= 2). Then A sends a Query that would sample for
minutes with a ``--query-deadline`` deadline: reported is how long after the
deadline the server's model thread went idle (goal: <= 1 s).

The server runs in this process (its event loop on a thread) so that the
scheduler's idleness can be read directly; the clients are threads of the same
process and share its cores (see cpu_count and load_average in the report).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import torch

from memsvc.model.tokenizer import VOCAB_SIZE
from memsvc.proto.v1 import memsvc_pb2 as pb
from memsvc.proto.v1 import memsvc_pb2_grpc as pb_grpc
from memsvc.runtime import tune_allocator
from memsvc.server.app import MemoryServer, ServerConfig
from memsvc.server.backends import load_engine, open_database
from memsvc.server.scheduler import SchedulerConfig
from memsvc.sessions.manager import ManagerConfig, SessionManager
from memsvc.store import metadata
from memsvc.store.hot_state import InProcessHotStateTracker
from memsvc.train.haystack import HELDOUT_VOCAB, filler

P99_RATIO_GOAL = 2.0  # B's append p99 beside A / alone
STOP_GOAL_S = 1.0  # an abandoned query's work ends this soon after its deadline
B_SESSIONS = 8
B_APPEND_TOKENS = 64
MESSAGE_BYTES = 8 << 20

Metadata = tuple[tuple[str, str], ...]


def run_neighbour_benchmark(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    tune_allocator()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="memsvc-bench-") as tmp:
        report = _measure(args, Path(tmp))
    report["load_average"] = (load_before, os.getloadavg()[0])
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0


class _InProcessServer:
    """A MemoryServer on loopback, its event loop on a thread of this process."""

    def __init__(self, model: Path, data_dir: Path, scheduling: SchedulerConfig) -> None:
        self.database = open_database(data_dir, None)
        engine = load_engine(model)
        self.manager = SessionManager(
            ManagerConfig(data_dir=data_dir, max_tokens_per_append=1 << 20),
            engine=engine,
            database=self.database,
            tracker=InProcessHotStateTracker(),
        )
        config = ServerConfig(
            address="127.0.0.1:0", max_message_bytes=MESSAGE_BYTES, scheduling=scheduling
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.server = MemoryServer(self.manager, self.database, config, VOCAB_SIZE)
        self.port = self._run(self.server.start())

    def tenant(self, name: str) -> Metadata:
        with self.database.unit_of_work() as db:
            _, key = metadata.create_tenant(
                db, name, max_sessions=1 << 20, tokens_per_minute=1 << 50
            )
        return (("authorization", f"Bearer {key}"),)

    def idle(self) -> bool:
        assert self.server.scheduler is not None
        return self.server.scheduler.idle()

    def stop(self) -> None:
        self._run(self.server.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self.database.dispose()

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()


def _measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    scheduling = SchedulerConfig(
        segment_tokens=args.segment_tokens,
        step_tokens=args.step_tokens,
        max_new_tokens=max(args.generate_tokens, 1 << 20),
    )
    server = _InProcessServer(args.model, tmp / "data", scheduling)
    channel = grpc.insecure_channel(
        f"127.0.0.1:{server.port}", options=[("grpc.max_send_message_length", MESSAGE_BYTES)]
    )
    stub = pb_grpc.MemoryServiceStub(channel)
    try:
        a, b = server.tenant("a"), server.tenant("b")
        b_sessions = [_create(stub, b) for _ in range(B_SESSIONS)]
        _small_appends(stub, b, b_sessions, 2)  # warm-up: restores, one-off costs
        alone = _small_appends(stub, b, b_sessions, args.b_appends)
        stop = threading.Event()
        with ThreadPoolExecutor(2) as pool:
            heavy = [
                pool.submit(_generate, stub, a, args.generate_tokens, stop),
                pool.submit(_bulk, stub, a, args.bulk_tokens, args.bulk_append_tokens, stop),
            ]
            time.sleep(0.5)  # A is under way
            beside = _small_appends(stub, b, b_sessions, args.b_appends)
            stop.set()
            generated, bulk = (future.result() for future in heavy)
        stop_s = _abandoned_query(stub, a, args.query_deadline, server.idle)
    finally:
        channel.close()
        server.stop()
    alone_p50, alone_p99 = _percentiles(alone)
    beside_p50, beside_p99 = _percentiles(beside)
    return {
        "model": str(args.model),
        "threads": args.threads,
        "segment_tokens": args.segment_tokens,
        "step_tokens": args.step_tokens,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "b": {
            "sessions": B_SESSIONS,
            "append_tokens": B_APPEND_TOKENS,
            "appends": len(alone),
            "alone": {"p50_ms": alone_p50 * 1e3, "p99_ms": alone_p99 * 1e3},
            "beside_a": {"p50_ms": beside_p50 * 1e3, "p99_ms": beside_p99 * 1e3},
        },
        "a_while_b_ran": {"generated_tokens": generated, "bulk_tokens_appended": bulk},
        "goals": {
            "b_p99_beside_vs_alone": _goal(beside_p99 / alone_p99, P99_RATIO_GOAL),
            "abandoned_query_stop_s": _goal(stop_s, STOP_GOAL_S),
        },
    }


def _create(stub: pb_grpc.MemoryServiceStub, tenant: Metadata) -> str:
    return stub.CreateSession(pb.CreateSessionRequest(), metadata=tenant).session_id


def _text(tokens: int, seed: int) -> bytes:
    """``tokens`` bytes of synthetic English sentences. Text, not one repeated byte: the
    server's guards damp (and checkpoint) a stream of one byte, which would measure their
    mitigations instead of the scheduler."""
    units = filler(random.Random(seed), "sentences", HELDOUT_VOCAB)
    out = bytearray()
    while len(out) < tokens:
        out += next(units).encode()
    return bytes(out[:tokens])


def _small_appends(
    stub: pb_grpc.MemoryServiceStub, tenant: Metadata, sessions: list[str], appends: int
) -> list[float]:
    """Each session appends 64-token pieces of text, one in flight; every append's latency."""
    text = _text(B_APPEND_TOKENS * appends * len(sessions), seed=1)
    cuts = itertools.count(0, B_APPEND_TOKENS)

    def stream(session_id: str) -> list[float]:
        latencies = []
        for _ in range(appends):
            start = next(cuts)  # pieces shared out between the threads: any split is text
            piece = pb.Input(text=text[start : start + B_APPEND_TOKENS])
            started = time.perf_counter()
            stub.Append(pb.AppendRequest(session_id=session_id, input=piece), metadata=tenant)
            latencies.append(time.perf_counter() - started)
        return latencies

    with ThreadPoolExecutor(len(sessions)) as pool:
        return [s for latencies in pool.map(stream, sessions) for s in latencies]


def _generate(
    stub: pb_grpc.MemoryServiceStub, tenant: Metadata, tokens: int, stop: threading.Event
) -> int:
    """A's long generation; cancelled once B is done. Returns the tokens received."""
    session_id = _create(stub, tenant)
    stub.Append(pb.AppendRequest(session_id=session_id, input=pb.Input(text=b"a")), metadata=tenant)
    params = pb.SamplingParams(max_new_tokens=tokens, allow_eos=False)
    request = pb.GenerateRequest(
        session_id=session_id, prompt=pb.Prompt(input=pb.Input(text=b"go"), params=params)
    )
    call = stub.Generate(request, metadata=tenant)
    received = 0
    try:
        for message in call:
            received += len(message.token_ids)
            if stop.is_set():
                call.cancel()
                break
    except grpc.RpcError as error:
        if error.code() is not grpc.StatusCode.CANCELLED:
            raise
    return received


def _bulk(
    stub: pb_grpc.MemoryServiceStub,
    tenant: Metadata,
    tokens: int,
    piece_tokens: int,
    stop: threading.Event,
) -> int:
    """A's bulk appends until `tokens` went in or B is done. Returns the tokens appended."""
    session_id = _create(stub, tenant)
    text = _text(piece_tokens, seed=2)
    appended = 0
    while appended < tokens and not stop.is_set():
        n = min(piece_tokens, tokens - appended)
        request = pb.AppendRequest(session_id=session_id, input=pb.Input(text=text[:n]))
        appended = stub.Append(request, metadata=tenant).position
    return appended


def _abandoned_query(
    stub: pb_grpc.MemoryServiceStub,
    tenant: Metadata,
    deadline_s: float,
    idle: Callable[[], bool],
) -> float:
    """Seconds from a long Query's deadline until the model thread is idle."""
    session_id = _create(stub, tenant)
    stub.Append(pb.AppendRequest(session_id=session_id, input=pb.Input(text=b"q")), metadata=tenant)
    params = pb.SamplingParams(max_new_tokens=1 << 20, allow_eos=False)
    request = pb.QueryRequest(
        session_id=session_id, prompt=pb.Prompt(input=pb.Input(text=b"?"), params=params)
    )
    deadline = time.perf_counter() + deadline_s
    try:
        stub.Query(request, metadata=tenant, timeout=deadline_s)
        raise RuntimeError("the query finished before its deadline; nothing was abandoned")
    except grpc.RpcError as error:
        if error.code() is not grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    while not idle():
        time.sleep(0.001)
    return max(0.0, time.perf_counter() - deadline)


def _percentiles(latencies: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return cuts[49], cuts[98]


def _goal(value: float, most: float) -> dict[str, Any]:
    return {"value": value, "goal": most, "met": value <= most}


def _print(report: dict[str, Any]) -> None:
    b = report["b"]
    print(
        f"tenant B: {b['sessions']} sessions x {b['appends'] // b['sessions']} appends of "
        f"{b['append_tokens']} tokens ({report['threads']} threads, {report['cpu_count']} cores, "
        f"steps of {report['step_tokens']}, segments of {report['segment_tokens']})"
    )
    for label, key in (("alone", "alone"), ("beside A", "beside_a")):
        row = b[key]
        print(f"  {label:9} p50 {row['p50_ms']:8.1f} ms   p99 {row['p99_ms']:8.1f} ms")
    a = report["a_while_b_ran"]
    print(
        f"tenant A meanwhile: {a['generated_tokens']} tokens generated, "
        f"{a['bulk_tokens_appended']:,} appended"
    )
    before, after = report["load_average"]
    print(f"load average {before:.1f} -> {after:.1f}")
    for name, goal in report["goals"].items():
        verdict = "met" if goal["met"] else "NOT met"
        print(f"{name}: {goal['value']:.3f} (goal <= {goal['goal']}): {verdict}")
