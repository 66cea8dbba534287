"""`memsvc bench lmm`: our memory and titans-pytorch 0.5.5 on the same work, same run.

Work per config: one stream (batch 1, float32) of `tokens` tokens fed as
64-token calls with the state carried between calls, and `stream_tokens`
tokens fed one at a time. Both implementations are timed by the same helper
(median of repeats after a warm-up), in the same process, one after the other.
Beside the 64-token calls, the GEMM floor (memsvc/bench/lmm_floor.py): the call's
matrix products alone, the most this chunk algorithm can do on this CPU, and its
ratio to the peer, the most the ratio can be here.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import torch

from memsvc.bench.lmm_floor import gemm_floor
from memsvc.bench.timing import peak_tensor_bytes, time_median
from memsvc.memory import MemoryConfig, NeuralMemory
from memsvc.runtime import tune_allocator

CHUNK = 64
EXPANSION = 4.0  # hidden width over dim, the same for ours, the peer and the floor


@dataclass
class Row:
    impl: str
    dim: int
    segment: int
    tokens: int
    tok_per_s: float
    peak_bytes: int
    state_bytes: int
    finite: bool  # every output of the stream is finite


def bench_memory(dim: int, optimizer: str = "momentum") -> NeuralMemory:
    """The memory both sides of the benchmark stand for: depth 2, expansion 4, one head."""
    cfg = MemoryConfig(
        dim=dim, heads=1, depth=2, expansion=EXPANSION, chunk_size=CHUNK, optimizer=optimizer
    )
    return NeuralMemory(cfg).eval()


def _stream_ours(memory: NeuralMemory, x: torch.Tensor, segment: int):
    state, outputs = None, []
    for start in range(0, x.shape[1], segment):
        y, state = memory(x[:, start : start + segment], state)
        outputs.append(y)
    return torch.cat(outputs, dim=1), state


def _measure(
    impl: str, dim: int, segment: int, x: torch.Tensor, repeats: int, threads: int, optimizer: str
) -> Row:
    if impl == "memsvc":
        memory = bench_memory(dim, optimizer)

        def run():
            return _stream_ours(memory, x, segment)

        def state_bytes(state) -> int:
            return state.nbytes()
    else:
        from memsvc.bench.titans_peer import build_titans_memory, stream_titans, titans_state_nbytes

        memory = build_titans_memory(
            dim, depth=2, expansion=EXPANSION, chunk_size=CHUNK, heads=1
        ).eval()

        def run():
            return stream_titans(memory, x, segment)

        state_bytes = titans_state_nbytes
    timing = time_median(run, repeats=repeats, warmup=1, threads=threads)
    with torch.no_grad():
        outputs, final = run()
    return Row(
        impl=impl,
        dim=dim,
        segment=segment,
        tokens=x.shape[1],
        tok_per_s=timing.per_second(x.shape[1]),
        peak_bytes=peak_tensor_bytes(run),
        state_bytes=state_bytes(final),
        finite=bool(torch.isfinite(outputs).all()),
    )


def run_lmm_command(args: argparse.Namespace) -> int:
    """`memsvc bench lmm`: the flags of memsvc/bench/cli.py onto :func:`run_lmm_benchmark`."""
    return run_lmm_benchmark(
        dims=args.dims,
        tokens=args.tokens,
        stream_tokens=args.stream_tokens,
        repeats=args.repeats,
        threads=args.threads,
        peer=not args.no_peer,
        as_json=args.json,
        optimizer=args.optimizer,
    )


def run_lmm_benchmark(
    dims: list[int],
    tokens: int = 4096,
    stream_tokens: int = 256,
    repeats: int = 5,
    threads: int = 2,
    peer: bool = True,
    as_json: bool = False,
    optimizer: str = "momentum",
) -> int:
    tune_allocator()
    torch.manual_seed(0)
    impls = ["memsvc", "titans-pytorch"] if peer else ["memsvc"]
    rows: list[Row] = []
    floors: dict[int, float] = {}
    for dim in dims:
        for segment, n in ((CHUNK, tokens), (1, stream_tokens)):
            x = torch.randn(1, n, dim)
            for impl in impls:
                rows.append(_measure(impl, dim, segment, x, repeats, threads, optimizer))
            if segment == CHUNK:
                floors[dim] = gemm_floor(dim, EXPANSION, CHUNK, optimizer, repeats, threads)
    report = _report(rows, threads, optimizer, floors)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)
    return 0


def _report(rows: list[Row], threads: int, optimizer: str, floors: dict[int, float]) -> dict:
    configs = []
    keyed = {(r.impl, r.dim, r.segment): r for r in rows}
    for (impl, dim, segment), ours in keyed.items():
        if impl != "memsvc":
            continue
        peer = keyed.get(("titans-pytorch", dim, segment))
        floor = floors.get(dim) if segment == CHUNK else None
        configs.append(
            {
                "dim": dim,
                "segment": segment,
                "tokens": ours.tokens,
                "memsvc": asdict(ours),
                "titans_pytorch": asdict(peer) if peer else None,
                "ratio": ours.tok_per_s / peer.tok_per_s if peer else None,
                "gemm_floor_tok_per_s": floor,
                "floor_vs_peer": floor / peer.tok_per_s if floor and peer else None,
            }
        )
    return {
        "work": "batch 1, float32, depth 2, expansion 4, chunk 64, heads 1, state carried",
        "memsvc_optimizer": optimizer,
        "threads": threads,
        "torch": torch.__version__,
        "configs": configs,
    }


def _print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"LMM streaming ({report['work']}; {report['threads']} threads;"
        f" memsvc optimizer {report['memsvc_optimizer']})"
    )
    for col in (
        "dim",
        "tokens/call",
        "memsvc tok/s",
        "titans tok/s",
        "ratio",
        "GEMM floor tok/s",
        "floor / peer",
        "peak MB (ours/peer)",
        "state KB (ours/peer)",
    ):
        table.add_column(col, justify="right")
    for c in report["configs"]:
        ours, peer = c["memsvc"], c["titans_pytorch"]
        table.add_row(
            str(c["dim"]),
            str(c["segment"]),
            f"{ours['tok_per_s']:,.0f}",
            f"{peer['tok_per_s']:,.0f}" if peer else "-",
            f"{c['ratio']:.2f}x" if peer else "-",
            f"{c['gemm_floor_tok_per_s']:,.0f}" if c["gemm_floor_tok_per_s"] else "-",
            f"{c['floor_vs_peer']:.2f}x" if c["floor_vs_peer"] else "-",
            f"{ours['peak_bytes'] / 1e6:.1f} / {peer['peak_bytes'] / 1e6:.1f}"
            if peer
            else f"{ours['peak_bytes'] / 1e6:.1f}",
            f"{ours['state_bytes'] / 1e3:.0f} / {peer['state_bytes'] / 1e3:.0f}"
            if peer
            else f"{ours['state_bytes'] / 1e3:.0f}",
        )
    Console(width=max(Console().width, 160)).print(table)
