"""GPU benchmark of the chunk update: the PyTorch path, the Triton kernel and titans-pytorch.

    scripts/bench-gpu-lmm [--out results.json] [--dims 256,512,1024] [--sessions 1,32,256]

Work per row: one chunk (64 tokens, 64 reads) of a depth-2 memory (hidden 4 x dim,
momentum, MSE, the NLMS step and update cap on) for S sessions with different
weights, float32 or bfloat16 weights. In this order, on one card, one process:

1. correctness: the kernel against the reference at every dim, both dtypes,
   with a ragged batch (stops with exit 1 on a mismatch: no speed without it);
2. the card's floors: copy bandwidth (a 2 GiB device-to-device copy) and matmul
   rate (8192^3, float32 without TF32 and bfloat16);
3. median times (CUDA events) of the PyTorch path (kernels.lmm.chunk_update_torch),
   the kernel, and titans-pytorch 0.5.5's NeuralMemory on one 64-token call with
   its state carried (the peer; it also projects q/k/v and gates, float32 only).

For each row: the bytes-moved floor (read weights, momentum, keys, values, gates,
queries; write weights, momentum, reads) over the measured bandwidth, the FLOP
floor over the measured matmul rate, and the fraction of the larger floor
achieved. Goals (the issue): kernel >= 3x the PyTorch path at 32+ sessions,
within 2x of the bandwidth floor at dim 512 with 256 sessions.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from kernels.lmm import chunk_update
from kernels.lmm.triton_chunk import Blocks, chunk_update_triton
from memsvc.memory.config import MemoryConfig

CHUNK = 64
READS = 64
GIB = 1 << 30


@dataclass
class Row:
    impl: str  # torch | triton | titans
    dtype: str
    dim: int
    sessions: int
    median_ms: float | None
    bytes_floor_ms: float
    flop_floor_ms: float
    fraction_of_floor: float | None  # max(floors) / median
    speedup_vs_torch: float | None
    note: str = ""


def config_for(dim: int) -> MemoryConfig:
    return MemoryConfig(dim=dim, heads=1, depth=2, expansion=4.0, chunk_size=CHUNK)


def make_inputs(
    cfg: MemoryConfig, sessions: int, dtype: torch.dtype, seed: int = 0, dev: str = "cuda"
):
    g = torch.Generator(device=dev).manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=g, device=dev)

    shapes = cfg.layer_shapes()
    weights = [
        randn(sessions, i, o, scale=1.0 if l == 0 else i**-0.5).to(dtype)
        for l, (i, o) in enumerate(shapes)
    ]
    momentum = [randn(sessions, i, o, scale=0.01).to(dtype) for i, o in shapes]
    d = cfg.head_dim
    k = torch.nn.functional.normalize(randn(sessions, CHUNK, d), dim=-1)
    q = torch.nn.functional.normalize(randn(sessions, READS, d), dim=-1)
    v = randn(sessions, CHUNK, d)
    u = torch.rand(sessions, CHUNK, 3, generator=g, device=dev)
    gates = torch.stack([u[..., 0], 0.95 * u[..., 1], 1e-3 * u[..., 2]], dim=-1)
    return weights, momentum, k, v, gates, q


def bytes_moved(cfg: MemoryConfig, sessions: int, dtype: torch.dtype) -> int:
    """The least one chunk must move: weights and momentum read and written once, keys,
    values, queries, gates read, reads written (float32)."""
    params = sum(i * o for i, o in cfg.layer_shapes())
    state = 2 * params * torch.tensor([], dtype=dtype).element_size()
    tokens = (2 * CHUNK + 2 * READS) * cfg.head_dim * 4 + CHUNK * 3 * 4
    return sessions * (2 * state + tokens)


def flops(cfg: MemoryConfig, sessions: int) -> int:
    """Matmul FLOPs of one chunk: forward of keys and reads, backward, gram, and the two
    gradient sums (momentum and weights) per layer."""
    rows, c = CHUNK + READS, CHUNK
    total = 0
    for layer, (i, o) in enumerate(cfg.layer_shapes()):
        total += 2 * rows * i * o  # forward
        total += 2 * c * i * o if layer > 0 else 0  # backward to the layer below
        total += 2 * c * c * (i + o)  # gram
        total += 2 * 2 * c * i * o  # H^T (G w) and H^T (G ws)
    return sessions * total


def time_cuda(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median seconds of fn() over `repeats` calls, CUDA events around each."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples)


def measure_card() -> dict[str, float]:
    """Copy bandwidth (bytes read + written per second) and matmul rates (FLOP/s)."""
    src = torch.empty(2 * GIB // 4, device="cuda", dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    copy_s = time_cuda(lambda: dst.copy_(src), repeats=10)
    src = dst = None  # free before the matmuls
    rates = {}
    n = 8192
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            a = torch.randn(n, n, device="cuda", dtype=dtype)
            b = torch.randn(n, n, device="cuda", dtype=dtype)
            rates[name] = 2 * n**3 / time_cuda(lambda a=a, b=b: a @ b, repeats=5)
            del a, b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow
    torch.cuda.empty_cache()
    return {
        "copy_bytes_per_s": 2 * 2 * GIB / copy_s,
        "matmul_float32_flop_per_s": rates["float32"],
        "matmul_bfloat16_flop_per_s": rates["bfloat16"],
    }


def check_correctness(
    dims: list[int], blocks: Blocks, precision: str, dev: str = "cuda"
) -> list[dict]:
    """The timed kernel vs the reference on a ragged batch of 4 sessions at each dim and
    dtype (errors relative to |reference| + 1). On "cpu" it needs TRITON_INTERPRET=1."""
    results = []
    fp32_tol = 1e-4 if precision == "ieee" else 5e-3
    for dim in dims:
        cfg = config_for(dim)
        for dtype, tol in ((torch.float32, fp32_tol), (torch.bfloat16, 3e-2)):
            chunk = make_inputs(cfg, 4, dtype, seed=dim, dev=dev)
            n_valid = torch.tensor([CHUNK, 17, 0, CHUNK - 1], device=dev)
            rule = cfg.chunk_rule
            got = chunk_update_triton(
                rule, *chunk, n_valid=n_valid, blocks=blocks, precision=precision
            )
            want = chunk_update(rule, *chunk, n_valid=n_valid, backend="torch")
            errors = {}
            layers = range(len(got.weights))
            pairs = {
                **{f"weights.{i}": (got.weights[i], want.weights[i]) for i in layers},
                **{f"momentum.{i}": (got.momentum[i], want.momentum[i]) for i in layers},
                "surprise_sq": (got.surprise_sq, want.surprise_sq),
                "reads": (got.reads, want.reads),
            }
            for name, (a, b) in pairs.items():
                a, b = a.float(), b.float()
                errors[name] = float(((a - b).abs() / (b.abs() + 1.0)).max())
            ok = all(e <= tol for e in errors.values())
            results.append(
                {
                    "dim": dim,
                    "dtype": str(dtype).removeprefix("torch."),
                    "ok": ok,
                    "tolerance": tol,
                    "max_rel_error": errors,
                }
            )
    return results


def titans_runner(dim: int, sessions: int) -> tuple[Callable[[], object] | None, str]:
    """titans-pytorch's memory on one 64-token call per session, state carried; None with a
    reason when it is not installed or does not fit."""
    try:
        from memsvc.bench.titans_peer import build_titans_memory
    except ImportError as err:
        return None, f"not run: {err}"
    try:
        memory = build_titans_memory(dim, depth=2, expansion=4.0, chunk_size=CHUNK).cuda().eval()
        x = torch.randn(sessions, CHUNK, dim, device="cuda")
        _, state = memory(x)  # weights per session exist from here on
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, "not run: out of memory"
    return (lambda: memory(x, state=state)), ""


def run(
    dims: list[int],
    sessions_list: list[int],
    repeats: int,
    budget_s: float,
    blocks: Blocks,
    precision: str,
) -> dict:
    started = time.monotonic()
    report: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": importlib.metadata.version("triton"),
        "chunk": CHUNK,
        "reads": READS,
        "blocks": asdict(blocks),
        "precision": precision,
    }
    report["correctness"] = correctness = check_correctness(dims, blocks, precision)
    for c in correctness:
        print(
            f"correctness dim={c['dim']} {c['dtype']}: {'ok' if c['ok'] else 'MISMATCH'} "
            f"max rel error {max(c['max_rel_error'].values()):.2e}"
        )
    if not all(c["ok"] for c in correctness):
        return report
    report["card"] = card = measure_card()
    print(
        f"copy {card['copy_bytes_per_s'] / 1e9:.0f} GB/s, matmul float32 "
        f"{card['matmul_float32_flop_per_s'] / 1e12:.1f} TFLOP/s, bfloat16 "
        f"{card['matmul_bfloat16_flop_per_s'] / 1e12:.1f} TFLOP/s"
    )
    print(HEADER)

    rows: list[Row] = []
    for dim in dims:
        cfg = config_for(dim)
        for sessions in sessions_list:
            for dtype in (torch.float32, torch.bfloat16):
                name = str(dtype).removeprefix("torch.")
                rate = card[f"matmul_{name}_flop_per_s"]
                bytes_ms = 1e3 * bytes_moved(cfg, sessions, dtype) / card["copy_bytes_per_s"]
                flop_ms = 1e3 * flops(cfg, sessions) / rate
                floor = max(bytes_ms, flop_ms)
                chunk = make_inputs(cfg, sessions, dtype)
                impls: dict[str, tuple[Callable[[], object] | None, str]] = {
                    "torch": (
                        lambda c=chunk, f=cfg.chunk_rule: chunk_update(f, *c, backend="torch"),
                        "",
                    ),
                    "triton": (
                        lambda c=chunk, f=cfg.chunk_rule: chunk_update_triton(
                            f, *c, blocks=blocks, precision=precision
                        ),
                        "",
                    ),
                }
                if dtype == torch.float32:
                    impls["titans"] = titans_runner(dim, sessions)
                base = None
                for impl, (fn, note) in impls.items():
                    median_ms = None
                    if fn is not None and time.monotonic() - started > budget_s:
                        fn, note = None, "not run: time budget spent"
                    if fn is not None:
                        try:
                            median_ms = 1e3 * time_cuda(fn, repeats)
                        except torch.cuda.OutOfMemoryError:
                            torch.cuda.empty_cache()
                            note = "out of memory"
                    if impl == "torch":
                        base = median_ms
                    row = Row(
                        impl=impl,
                        dtype=name,
                        dim=dim,
                        sessions=sessions,
                        median_ms=median_ms,
                        bytes_floor_ms=bytes_ms,
                        flop_floor_ms=flop_ms,
                        fraction_of_floor=None if median_ms is None else floor / median_ms,
                        speedup_vs_torch=None if not (median_ms and base) else base / median_ms,
                        note=note,
                    )
                    rows.append(row)
                    print(format_row(row), flush=True)
                del chunk, impls
                torch.cuda.empty_cache()
    report["rows"] = [asdict(r) for r in rows]
    report["goals"] = goals(rows)
    report["seconds"] = time.monotonic() - started
    return report


def goals(rows: list[Row]) -> dict:
    kernel = [r for r in rows if r.impl == "triton" and r.median_ms is not None]
    speed = [r for r in kernel if r.sessions >= 32]
    target = [r for r in kernel if r.dim == 512 and r.sessions == 256]
    return {
        "speedup_3x_at_32_plus_sessions": {
            f"{r.dtype}/dim{r.dim}/s{r.sessions}": (r.speedup_vs_torch or 0) >= 3 for r in speed
        },
        "within_2x_of_bandwidth_floor_dim512_s256": {
            r.dtype: r.median_ms <= 2 * r.bytes_floor_ms for r in target
        },
    }


HEADER = (
    f"{'impl':<7}{'dtype':<10}{'dim':>5}{'sess':>6}{'median ms':>11}{'bytes floor':>13}"
    f"{'flop floor':>12}{'of floor':>10}{'vs torch':>10}  note"
)


def format_row(r: Row) -> str:
    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    return (
        f"{r.impl:<7}{r.dtype:<10}{r.dim:>5}{r.sessions:>6}{num(r.median_ms, '.3f'):>11}"
        f"{r.bytes_floor_ms:>13.3f}{r.flop_floor_ms:>12.3f}{num(r.fraction_of_floor, '.0%'):>10}"
        f"{num(r.speedup_vs_torch, '.2f'):>10}  {r.note}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--dims", default="256,512,1024")
    parser.add_argument("--sessions", default="1,32,256")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--blocks", default="", help="kernel tiles n,k,rows,cols,num_warps (default: Blocks())"
    )
    parser.add_argument(
        "--precision", default="ieee", choices=["ieee", "tf32"], help="float32 matmuls"
    )
    parser.add_argument(
        "--budget-s", type=float, default=180.0, help="stop timing new rows after this many seconds"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench-gpu-lmm: no CUDA device here; this benchmark runs on a GPU machine "
            "(the kernel's CPU tests: pytest tests/kernels)",
            file=sys.stderr,
        )
        return 2
    dims = [int(x) for x in args.dims.split(",")]
    sessions = [int(x) for x in args.sessions.split(",")]
    blocks = Blocks(*map(int, args.blocks.split(","))) if args.blocks else Blocks()
    with torch.no_grad():
        report = run(dims, sessions, args.repeats, args.budget_s, blocks, args.precision)
    if "goals" in report:
        print(json.dumps(report["goals"], indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if all(c["ok"] for c in report["correctness"]) else 1


if __name__ == "__main__":
    sys.exit(main())
