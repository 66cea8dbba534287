"""`memsvc bench ...`: where every benchmark registers its command.

Each benchmark prints its peer or baseline in the same run. The parsers live here and
import nothing heavy; the benchmark modules are imported when their command runs.
A new benchmark adds one ``_add_<name>`` function and one entry in :data:`BENCHES`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from memsvc.commands import deferred, module_description
from memsvc.reliability.cli import add_reliability_parser
from memsvc.settings import MODEL_HELP, model_dir


def _int_list(text: str) -> list[int]:
    return [int(n) for n in text.split(",")]


def _add_lmm(benches: argparse._SubParsersAction) -> None:
    lmm = benches.add_parser(
        "lmm", help="memory streaming throughput vs titans-pytorch 0.5.5 (same run)"
    )
    lmm.add_argument("--dims", type=_int_list, default=[256, 512], help="memory widths")
    lmm.add_argument("--tokens", type=int, default=4096, help="tokens per 64-token-chunk run")
    lmm.add_argument("--stream-tokens", type=int, default=256, help="tokens fed one at a time")
    lmm.add_argument("--repeats", type=int, default=5)
    lmm.add_argument("--threads", type=int, default=2)
    lmm.add_argument("--no-peer", action="store_true", help="skip titans-pytorch")
    lmm.add_argument("--json", action="store_true", help="print one JSON object")
    lmm.add_argument(
        "--optimizer",
        default="momentum",
        choices=["momentum", "chunk_momentum", "sgd"],
        help="our inner optimiser (chunk_momentum is titans-pytorch's recurrence)",
    )
    lmm.set_defaults(func=deferred("memsvc.bench.lmm:run_lmm_command"))


def _add_serve(benches: argparse._SubParsersAction) -> None:
    serve = benches.add_parser(
        "serve",
        help="gRPC streaming throughput and ack latency vs the in-process engine (same run)",
        description=module_description("memsvc.bench.serve"),
    )
    serve.add_argument("--model", type=model_dir, default="default", help=MODEL_HELP)
    serve.add_argument(
        "--sessions", type=_int_list, default=[1, 8, 32, 128], help="concurrencies measured"
    )
    serve.add_argument("--tokens-per-session", type=int, default=2048)
    serve.add_argument(
        "--append-tokens", type=int, default=64, help="tokens per append (64: a memory chunk)"
    )
    serve.add_argument("--window", type=int, default=2, help="appends in flight per stream")
    serve.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="sweeps of both paths, alternating; each row reports the medians",
    )
    serve.add_argument("--threads", type=int, default=2, help="torch threads (both paths)")
    serve.add_argument("--json", action="store_true", help="print one JSON object")
    serve.add_argument(
        "--neighbour",
        action="store_true",
        help="the noisy-neighbour case instead (tenant A's heavy work beside B's appends)",
    )
    serve.add_argument(
        "--generate",
        action="store_true",
        help="concurrent Generate streams vs the engine's batched decoder instead",
    )
    serve.add_argument("--bulk-tokens", type=int, default=1_000_000, help="--neighbour: A's bulk")
    serve.add_argument("--bulk-append-tokens", type=int, default=65536)
    serve.add_argument(
        "--generate-tokens",
        type=int,
        default=10_000,
        help="--neighbour: A's generation; --generate: per stream (use e.g. 512)",
    )
    serve.add_argument("--b-appends", type=int, default=40, help="--neighbour: per B session")
    serve.add_argument("--query-deadline", type=float, default=1.0, help="--neighbour: seconds")
    serve.add_argument("--segment-tokens", type=int, default=256, help="--neighbour: server's")
    serve.add_argument("--step-tokens", type=int, default=1024, help="--neighbour: server's")
    serve.set_defaults(func=deferred("memsvc.bench.serve:run_serve_benchmark"))


def _add_swap(benches: argparse._SubParsersAction) -> None:
    swap = benches.add_parser(
        "swap",
        help="evict / restore latency by state size vs the disk's write and read (same run)",
        description=module_description("memsvc.bench.swap"),
    )
    swap.add_argument(
        "--windows",
        type=_int_list,
        default=[128, 2048, 8192, 32768],
        help="attention windows; 128 is the reference model (~0.3, 4, 17, 67 MB states)",
    )
    swap.add_argument("--repeats", type=int, default=30, help="timed evict/restore pairs per size")
    swap.add_argument("--dir", type=Path, default=Path("data"), help="where the scratch data goes")
    swap.add_argument("--device", default="cpu", help="the engine's device (cpu, cuda)")
    swap.add_argument("--threads", type=int, default=2, help="torch threads")
    swap.add_argument("--json", action="store_true", help="print one JSON object")
    swap.set_defaults(func=deferred("memsvc.bench.swap:run_swap_benchmark"))


# The registration point: one function per `memsvc bench NAME`, in the order --help lists them.
def _add_decode(benches: argparse._SubParsersAction) -> None:
    decode = benches.add_parser(
        "decode",
        help="generation tokens/s (1, 8, 32 sessions) vs the reference path, bulk append "
        "and the compute floor (same run)",
        description=module_description("memsvc.bench.decode"),
    )
    decode.add_argument("--model", type=model_dir, default="default", help=MODEL_HELP)
    decode.add_argument("--tokens", type=int, default=256, help="tokens per decoder generation")
    decode.add_argument(
        "--reference-tokens", type=int, default=64, help="tokens per reference generation"
    )
    decode.add_argument(
        "--sessions", type=_int_list, default=[1, 8, 32], help="concurrent generations"
    )
    decode.add_argument("--history", type=int, default=256, help="tokens appended before")
    decode.add_argument("--bulk-tokens", type=int, default=4096, help="tokens of the bulk append")
    decode.add_argument("--repeats", type=int, default=5)
    decode.add_argument("--threads", type=int, default=1, help="torch threads (every path)")
    decode.add_argument("--json", action="store_true", help="print one JSON object")
    decode.set_defaults(func=deferred("memsvc.bench.decode:run_decode_command"))


def _add_dispatch(benches: argparse._SubParsersAction) -> None:
    dispatch = benches.add_parser(
        "dispatch",
        help="microseconds per small op: eager PyTorch vs TorchScript vs ATen from C++ (same run)",
        description=module_description("memsvc.bench.dispatch"),
    )
    dispatch.add_argument("--dim", type=int, default=128, help="row width (the model's d_model)")
    dispatch.add_argument("--calls", type=int, default=200, help="chains per timed repeat")
    dispatch.add_argument("--repeats", type=int, default=7)
    dispatch.add_argument("--no-cpp", action="store_true", help="skip the C++ extension build")
    dispatch.add_argument("--json", action="store_true", help="print one JSON object")
    dispatch.set_defaults(func=deferred("memsvc.bench.dispatch:run_dispatch_command"))


BENCHES: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_lmm,
    _add_serve,
    _add_swap,
    _add_decode,
    _add_dispatch,
    add_reliability_parser,
)


def add_bench_parser(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="benchmarks that print their peer beside them")
    benches = bench.add_subparsers(dest="bench", required=True)
    for add in BENCHES:
        add(benches)
