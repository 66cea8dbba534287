"""`memsvc bench serve`: streaming through gRPC beside the in-process engine, same run.

For each concurrency N (1, 8, 32, 128 sessions by default) every session
streams the same tokens in fixed-size appends (64 tokens by default: one
memory chunk, as an agent streams turn by turn), through two paths, one
after the other on the same model and threads:

    engine   StreamingEngine.step_batch over N states, in this process: no
             network, no durability. The ceiling.
    grpc     the service: async SDK -> gRPC (loopback) -> scheduler ->
             SessionManager (WAL fsync before each ack) -> engine, in a
             `memsvc serve` child process; one stream per session with
             `window` appends in flight.

Reported: aggregate tokens/s for both, p50 / p99 latency of an append (engine: one
batched step; grpc: from sending an append to its acknowledgement), the disk's
fdatasync of a log-record-sized write beside them (its share of an acknowledgement),
and the goals of docs/ARCHITECTURE.md ("Goals"): 1 session through gRPC >= 80% of
in-process, 32 sessions >= 4x the aggregate of 1. With `--repeats N` the sweep runs
N times, alternating the paths; a row shows each path's median-throughput run and
the median of the paired gRPC / engine ratios (short runs on a shared machine
scatter by tens of percent). Batching can only gain where one session leaves the
cores idle: with large appends a single stream already fills them, and the engine's
own N-session row is the ceiling. The client runs on the same cores as the server,
and so does anything else on the machine: see cpu_count and load_average in the
report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kernels import decode_step
from memsvc.bench.neighbour import run_neighbour_benchmark
from memsvc.client.aio import AsyncMemoryClient, AsyncSession
from memsvc.engine import StreamingEngine
from memsvc.model.io import load_model, model_hash
from memsvc.runtime import tune_allocator
from memsvc.server.backends import open_database
from memsvc.server.process import ServerProcess
from memsvc.store import metadata

SINGLE_SESSION_GOAL = 0.8  # grpc / engine, one session
BATCHING_GOAL = 4.0  # aggregate at 32 sessions / aggregate at 1, through grpc


@dataclass(frozen=True)
class Run:
    """One path at one concurrency."""

    sessions: int
    tokens: int  # over all sessions
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.seconds


def run_serve_benchmark(args: argparse.Namespace) -> int:
    if args.neighbour:
        return run_neighbour_benchmark(args)
    if args.generate:
        from memsvc.bench.generate import run_generate_benchmark

        return run_generate_benchmark(args)
    if args.tokens_per_session % args.append_tokens:
        raise SystemExit("--tokens-per-session must be a multiple of --append-tokens")
    torch.set_num_threads(args.threads)
    tune_allocator()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="memsvc-bench-") as tmp:
        engine_runs, grpc_runs = asyncio.run(_runs(args, Path(tmp)))
        fsync = disk_fsync(Path(tmp))
    report = _report(args, engine_runs, grpc_runs, (load_before, os.getloadavg()[0]))
    report["disk_fsync_ms"] = fsync
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0


async def _runs(args: argparse.Namespace, tmp: Path) -> tuple[list[list[Run]], list[list[Run]]]:
    """Both paths at each concurrency, one right after the other, so that a change in
    what else the machine runs hits both alike (the idle server costs nothing); the
    whole sweep `args.repeats` times. Returns the runs per concurrency, in sweep order."""
    appends = args.tokens_per_session // args.append_tokens
    seed = torch.Generator().manual_seed(0)
    piece = torch.randint(32, 127, (args.append_tokens,), generator=seed)
    if decode_step.enabled():
        decode_step.load()  # built once here, so the server only loads it (seconds)
    engine = StreamingEngine(load_model(args.model))
    server, api_key = start_server(args, tmp)
    engine_runs: list[list[Run]] = [[] for _ in args.sessions]
    grpc_runs: list[list[Run]] = [[] for _ in args.sessions]
    with server:
        await asyncio.to_thread(server.start)
        async with AsyncMemoryClient(server.address, api_key, timeout=None) as client:
            await asyncio.to_thread(_engine_run, engine, 1, 2, piece)  # warm-up: one-off costs
            # The server loads its C++ kernels in the background when it starts (1-3 s
            # once built); until then its appends take the eager path.
            warm_until = time.perf_counter() + WARM_UP_S
            while time.perf_counter() < warm_until:
                await _grpc_run(client, 1, 8, piece.tolist(), args.window)
            for _ in range(args.repeats):
                for i, sessions in enumerate(args.sessions):
                    engine_runs[i].append(
                        await asyncio.to_thread(_engine_run, engine, sessions, appends, piece)
                    )
                    grpc_runs[i].append(
                        await _grpc_run(client, sessions, appends, piece.tolist(), args.window)
                    )
        await asyncio.to_thread(server.stop)
    return engine_runs, grpc_runs


def start_server(
    args: argparse.Namespace, tmp: Path, extra: tuple[str, ...] = (), log_level: str = "warning"
) -> tuple[ServerProcess, str]:
    """`memsvc serve` on embedded defaults in tmp, and the key of a tenant without limits.
    Its log (tmp/server.log) holds `log_level` and above."""
    data_dir = tmp / "data"
    database = open_database(data_dir, None)
    with database.unit_of_work() as db:
        _, api_key = metadata.create_tenant(
            db, "bench", max_sessions=1 << 30, tokens_per_minute=1 << 50
        )
    database.dispose()
    server_args = ["--model", str(args.model), "--data-dir", str(data_dir)]
    server_args += ["--threads", str(args.threads), *extra]
    return ServerProcess(server_args, tmp / "server.log", log_level=log_level), api_key


WARM_UP_S = 4.0


def _engine_run(engine: StreamingEngine, sessions: int, appends: int, piece: torch.Tensor) -> Run:
    states = [engine.init_state() for _ in range(sessions)]
    steps = []
    started = time.perf_counter()
    for _ in range(appends):
        step_started = time.perf_counter()
        states = [state for state, _ in engine.step_batch(states, [piece] * sessions)]
        steps.append(time.perf_counter() - step_started)
    seconds = time.perf_counter() - started
    return _run(sessions, sessions * appends * len(piece), seconds, steps)


async def _grpc_run(
    client: AsyncMemoryClient, sessions: int, appends: int, tokens: list[int], window: int
) -> Run:
    created = [await client.create_session(f"bench-{sessions}-{i}") for i in range(sessions)]
    latencies: list[float] = []

    async def stream(session: AsyncSession) -> None:
        sent: deque[float] = deque()
        # The SDK reads pieces ahead of its window (a queue of one, and the piece waiting
        # to enter it), so a piece is handed over only while fewer than `window` are
        # unacknowledged: its clock starts when the stream has room for it, not up to two
        # appends earlier (which tripled the latency reported at window 1).
        room = asyncio.Semaphore(window)

        async def pieces() -> AsyncIterator[list[int]]:
            for _ in range(appends):
                await room.acquire()
                sent.append(time.perf_counter())
                yield tokens

        async for _ in session.append_stream(pieces(), window=window):
            latencies.append(time.perf_counter() - sent.popleft())
            room.release()

    started = time.perf_counter()
    await asyncio.gather(*(stream(session) for session in created))
    seconds = time.perf_counter() - started
    for session in created:
        await session.delete()
    return _run(sessions, sessions * appends * len(tokens), seconds, latencies)


def _run(sessions: int, tokens: int, seconds: float, latencies: list[float]) -> Run:
    cuts = (
        statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else None
    )
    p50, p99 = (cuts[49], cuts[98]) if cuts else (latencies[0], latencies[0])
    return Run(sessions, tokens, seconds, p50 * 1e3, p99 * 1e3)


def _median_run(runs: list[Run]) -> Run:
    """The run of median throughput (the lower middle one of an even count)."""
    return sorted(runs, key=lambda run: run.tok_per_s)[(len(runs) - 1) // 2]


def _report(
    args: argparse.Namespace,
    engine_runs: list[list[Run]],
    grpc_runs: list[list[Run]],
    load_average: tuple[float, float],
) -> dict:
    """One row per concurrency: each path's median-throughput run, and the median of the
    sweeps' paired gRPC / engine ratios (each sweep ran both paths back to back)."""
    rows = []
    for engines, grpcs in zip(engine_runs, grpc_runs, strict=True):
        e, g = _median_run(engines), _median_run(grpcs)
        ratios = [b.tok_per_s / a.tok_per_s for a, b in zip(engines, grpcs, strict=True)]
        rows.append(
            {
                "sessions": e.sessions,
                "engine": {**asdict(e), "tok_per_s": e.tok_per_s},
                "grpc": {**asdict(g), "tok_per_s": g.tok_per_s},
                "grpc_vs_engine": statistics.median(ratios),
                "grpc_vs_engine_per_repeat": ratios,
            }
        )
    by_sessions = {g.sessions: g for g in (_median_run(runs) for runs in grpc_runs)}
    goals = {}
    if 1 in by_sessions:
        goals["single_session_grpc_vs_engine"] = {
            "value": next(r["grpc_vs_engine"] for r in rows if r["sessions"] == 1),
            "goal": SINGLE_SESSION_GOAL,
        }
        if 32 in by_sessions:
            goals["grpc_32_vs_1_sessions"] = {
                "value": by_sessions[32].tok_per_s / by_sessions[1].tok_per_s,
                "goal": BATCHING_GOAL,
            }
    for goal in goals.values():
        goal["met"] = goal["value"] >= goal["goal"]
    return {
        **run_context(args, load_average),
        "tokens_per_session": args.tokens_per_session,
        "append_tokens": args.append_tokens,
        "window": args.window,
        "repeats": args.repeats,
        "rows": rows,
        "goals": goals,
    }


def disk_fsync(directory: Path, records: int = 200, size: int = 300) -> dict[str, float]:
    """The disk's own share of an acknowledgement: p50 / p99 ms of appending a ``size``-byte
    record to a file in ``directory`` (the server's data directory) and fdatasync-ing it,
    as the server's log does for a 64-token append."""
    times = []
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(records):
            os.write(fd, b"\0" * size)
            started = time.perf_counter()
            os.fdatasync(fd)
            times.append(1000 * (time.perf_counter() - started))
    finally:
        os.close(fd)
        path.unlink()
    times.sort()
    return {"p50": times[len(times) // 2], "p99": times[int(0.99 * (len(times) - 1))]}


def run_context(args: argparse.Namespace, load_average: tuple[float, float]) -> dict:
    """What a serving benchmark ran on: model, threads, cores and how busy they were."""
    return {
        "model": str(args.model),
        "model_hash": model_hash(args.model),
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        # Runnable processes (1-minute load average) before and after: well above cpu_count
        # means the run shared its cores and its numbers are pessimistic.
        "load_average": load_average,
        "torch": torch.__version__,
    }


def _print(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"streaming through gRPC vs in process ({report['append_tokens']} tokens per "
        f"append, {report['tokens_per_session']:,} per session, {report['threads']} threads; "
        f"medians of {report['repeats']} alternating sweeps)"
    )
    for column in (
        "sessions",
        "engine tok/s",
        "grpc tok/s",
        "grpc / engine",
        "engine step p50 / p99 ms",
        "grpc ack p50 / p99 ms",
    ):
        table.add_column(column, justify="right")
    for row in report["rows"]:
        e, g = row["engine"], row["grpc"]
        table.add_row(
            str(row["sessions"]),
            f"{e['tok_per_s']:,.0f}",
            f"{g['tok_per_s']:,.0f}",
            f"{row['grpc_vs_engine']:.0%}",
            f"{e['p50_ms']:,.1f} / {e['p99_ms']:,.1f}",
            f"{g['p50_ms']:,.1f} / {g['p99_ms']:,.1f}",
        )
    console = Console(width=max(Console().width, 120))
    console.print(table)
    before, after = report["load_average"]
    console.print(f"load average {before:.1f} -> {after:.1f} on {report['cpu_count']} cores")
    fsync = report["disk_fsync_ms"]
    console.print(
        f"the disk's fdatasync of a log record (in the server's data directory): "
        f"p50 {fsync['p50']:.2f} ms, p99 {fsync['p99']:.2f} ms"
    )
    for name, goal in report["goals"].items():
        verdict = "[green]met[/]" if goal["met"] else "[red]not met[/]"
        console.print(f"{name}: {goal['value']:.2f} (goal >= {goal['goal']}): {verdict}")
