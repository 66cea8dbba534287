"""`memsvc bench serve --generate`: concurrent Generate streams through gRPC beside the
engine's batched decoder, same run.

For each concurrency N (1, 8, 32 by default) N sessions each generate
``--generate-tokens`` tokens at once (greedy, EOS off, so every stream runs its full
length), on two paths one after the other on the same model and threads:

    engine   StreamingEngine.decode_batch over N states in this process: the
             batched decoder with no network, no sessions, no durability.
    grpc     the service: async SDK -> gRPC (loopback) -> scheduler, whose steps
             sample every running generation in one decoder batch (`DecodePool`)
             -> the commit of each generation (WAL fsync), in a `memsvc serve`
             child process.

Reported: aggregate tokens/s of both paths, grpc / engine, and the batching each
path gets (aggregate at N / aggregate at 1; the goal for 32 is >= 4x). The client
runs on the same cores as the server: see cpu_count and load_average. Both paths
decode with the C++ step (kernels/decode_step): the run waits until this process has
it and the server has logged that it has (`decode_step` in the report says what each
had); until then a decoder runs the eager step, about 4x slower.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kernels import decode_step
from memsvc.bench.serve import run_context, start_server
from memsvc.client.aio import AsyncMemoryClient
from memsvc.engine import SamplingParams, StreamingEngine
from memsvc.model.io import load_model
from memsvc.runtime import tune_allocator

BATCHING_GOAL = 4.0  # aggregate at 32 concurrent generations / at 1


@dataclass(frozen=True)
class GenerateRun:
    sessions: int
    tokens: int  # over all sessions
    seconds: float

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.seconds


def run_generate_benchmark(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    tune_allocator()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="memsvc-bench-") as tmp:
        most = str(max(args.sessions))  # one tenant runs them all
        limits = (
            "--max-generations-per-tenant",
            most,
            "--max-new-tokens",
            str(args.generate_tokens),
        )
        # info: the server logs when its C++ decode step is ready (decode_cpp_ready)
        server, api_key = start_server(args, Path(tmp), limits, log_level="info")
        engine_runs, grpc_runs, steps = asyncio.run(_runs(args, server, api_key))
    report = _report(args, engine_runs, grpc_runs, (load_before, os.getloadavg()[0]))
    report["decode_step"] = steps
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0


# What the server logs once its C++ decode step is loaded, or cannot be.
_DECODE_EVENTS = ("decode_cpp_ready", "decode_cpp_unavailable")


async def _runs(
    args, server, api_key: str
) -> tuple[list[GenerateRun], list[GenerateRun], dict[str, str]]:
    """The engine and gRPC runs, and the decode step each path had ("cpp" / "eager")."""
    engine = StreamingEngine(load_model(args.model))
    tokens = args.generate_tokens
    engine_runs, grpc_runs = [], []
    steps: dict[str, str] = {}
    with server:
        await asyncio.to_thread(server.start)
        steps["engine"] = await asyncio.to_thread(_engine_decode_step)
        server_step = await asyncio.to_thread(server.wait_for_event, _DECODE_EVENTS, 300.0)
        steps["server"] = {"decode_cpp_ready": "cpp", None: "unknown"}.get(server_step, "eager")
        async with AsyncMemoryClient(server.address, api_key, timeout=None) as client:
            await asyncio.to_thread(_engine_run, engine, 1, 8)  # warm-up: one-off costs
            await _grpc_run(client, 1, 8)
            for sessions in args.sessions:
                engine_runs.append(await asyncio.to_thread(_engine_run, engine, sessions, tokens))
                grpc_runs.append(await _grpc_run(client, sessions, tokens))
        await asyncio.to_thread(server.stop)
    return engine_runs, grpc_runs, steps


def _engine_decode_step() -> str:
    """The C++ decode step in this process, built now if need be: "cpp", else "eager"."""
    try:
        decode_step.load()
    except RuntimeError:
        return "eager"
    return "cpp"


def _engine_run(engine: StreamingEngine, sessions: int, tokens: int) -> GenerateRun:
    params = SamplingParams(temperature=0, allow_eos=False, max_new_tokens=tokens)
    states = [engine.init_state() for _ in range(sessions)]
    started = time.perf_counter()
    produced = sum(1 for _ in engine.decode_batch(states, [[65]] * sessions, params))
    return GenerateRun(sessions, produced, time.perf_counter() - started)


async def _grpc_run(client: AsyncMemoryClient, sessions: int, tokens: int) -> GenerateRun:
    created = [await client.create_session(f"gen-{sessions}-{i}") for i in range(sessions)]

    async def generate(session) -> None:
        sampling = {"temperature": 0.0, "allow_eos": False, "max_new_tokens": tokens}
        async for _ in session.generate("A", **sampling):
            pass

    started = time.perf_counter()
    await asyncio.gather(*(generate(session) for session in created))
    seconds = time.perf_counter() - started
    produced = 0
    for session in created:  # the session's position: the prompt byte and what was generated
        produced += (await session.refresh()).position - 1
        await session.delete()
    return GenerateRun(sessions, produced, seconds)


def _report(args, engine_runs, grpc_runs, load_average) -> dict:
    def ratio(runs: list[GenerateRun], n: int) -> float | None:
        by = {r.sessions: r for r in runs}
        return by[n].tok_per_s / by[1].tok_per_s if n in by and 1 in by else None

    rows = [
        {
            "sessions": e.sessions,
            "engine": {**asdict(e), "tok_per_s": e.tok_per_s},
            "grpc": {**asdict(g), "tok_per_s": g.tok_per_s},
            "grpc_vs_engine": g.tok_per_s / e.tok_per_s,
            "engine_vs_1": ratio(engine_runs, e.sessions),
            "grpc_vs_1": ratio(grpc_runs, g.sessions),
        }
        for e, g in zip(engine_runs, grpc_runs, strict=True)
    ]
    goals = {}
    if (value := ratio(grpc_runs, 32)) is not None:
        goals["grpc_32_vs_1_generations"] = {
            "value": value,
            "goal": BATCHING_GOAL,
            "met": value >= BATCHING_GOAL,
        }
    return {
        **run_context(args, load_average),
        "generate_tokens": args.generate_tokens,
        "rows": rows,
        "goals": goals,
    }


def _print(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"concurrent generations through gRPC vs the engine's batched decoder "
        f"({report['generate_tokens']:,} tokens each, {report['threads']} threads)"
    )
    for column in ("generations", "engine tok/s", "grpc tok/s", "grpc / engine", "engine xN/1",
                   "grpc xN/1"):  # fmt: skip
        table.add_column(column, justify="right")
    for row in report["rows"]:
        table.add_row(
            str(row["sessions"]),
            f"{row['engine']['tok_per_s']:,.0f}",
            f"{row['grpc']['tok_per_s']:,.0f}",
            f"{row['grpc_vs_engine']:.0%}",
            f"{row['engine_vs_1']:.2f}x" if row["engine_vs_1"] else "",
            f"{row['grpc_vs_1']:.2f}x" if row["grpc_vs_1"] else "",
        )
    console = Console()
    console.print(table)
    for name, goal in report["goals"].items():
        mark = "met" if goal["met"] else "NOT met"
        console.print(f"{name}: {goal['value']:.2f} (goal >= {goal['goal']}) {mark}")
    console.print(f"load average before/after: {report['load_average']}")
    console.print(f"decode step (engine / server): {report.get('decode_step')}")
