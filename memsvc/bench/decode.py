"""`memsvc bench decode`: generation tokens/s beside its baselines, all in one run.

Measured on one model and thread count, each a median over repeats:

- reference: `StreamingEngine.generate` through the chunk path one token at a time
  (`fast_decode=False`), the path the decoder is tested equal to;
- decode: the decoder (`decode_batch`) with 1, 8 and 32 concurrent generations
  (aggregate tokens/s), with its C++ step (kernels/decode_step, built first);
- decode eager: the same decoder with its eager step (every op an ATen dispatch),
  1 session, the peer of the C++ step;
- bulk append: one long append (tokens/s), the engine's best case;
- appends of 1 and 64 tokens: engine time per call (the C++ chunk path,
  memsvc/model/chunk_fast.py), beside the same appends on `MAGModel.forward`; and
  through `step_batch` (the server's path) 64 tokens, and 50 tokens from 30 tokens
  into a memory chunk (an unaligned turn, which crosses a chunk boundary);
- the compute floor: the model's FLOPs per generated token over the rate a large
  GEMM reaches here; what no implementation on this CPU can beat.

Greedy sampling with EOS off, so every generation runs its full length. On a
shared machine, compare the same-run ratios; `cpu_util` below the thread count
says the run did not get its cores, and the CPU-time rate is printed beside the
wall-clock one.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels import decode_step
from memsvc.bench.timing import Timing, time_median
from memsvc.engine import SamplingParams, StreamingEngine
from memsvc.model import MAGModel, load_model


@dataclass(frozen=True)
class Rate:
    """One measured line: items per call, and its timing."""

    name: str
    items: int
    timing: Timing

    @property
    def per_s(self) -> float:
        return self.timing.per_second(self.items)

    @property
    def per_cpu_s(self) -> float:
        """Items per CPU-second of this process (median CPU sample)."""
        cpu = sorted(self.timing.cpu_samples_s)[len(self.timing.cpu_samples_s) // 2]
        return self.items / cpu if cpu > 0 else float("inf")

    def row(self) -> dict[str, float | str | int]:
        return {
            "name": self.name,
            "items": self.items,
            "median_ms": 1e3 * self.timing.median_s,
            "per_s": self.per_s,
            "per_cpu_s": self.per_cpu_s,
            "cpu_util": self.timing.cpu_utilisation,
        }


def flops_per_token(model: MAGModel) -> float:
    """Multiply-adds x 2 of one generated token: every GEMM weight, the attention over
    persistent + window + itself, and the memory's read and per-token write."""
    cfg = model.config
    gemm = sum(
        p.numel()
        for name, p in model.named_parameters()
        if p.dim() == 2 and not name.startswith("embed")
    )
    attention = 2 * cfg.d_model * (cfg.n_persistent + cfg.window + 1)  # scores and values
    memory = 0
    if cfg.use_memory:
        shapes = cfg.memory.layer_shapes()
        memory = 3 * cfg.memory.heads * sum(i * o for i, o in shapes)  # read, residual, write
    return 2.0 * (gemm + cfg.n_layers * (attention + memory))


def gemm_flops_per_s(threads: int, size: int = 512) -> float:
    """FLOP/s of a (size x size) x (size x size) float32 GEMM on `threads` threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    timing = time_median(lambda: a @ b, repeats=9, warmup=2, threads=threads)
    return 2.0 * size**3 / timing.median_s


def run_decode_benchmark(
    model_dir: Path,
    tokens: int,
    reference_tokens: int,
    sessions: list[int],
    history: int,
    bulk_tokens: int,
    repeats: int,
    threads: int,
) -> dict:
    """Every measurement of the module docstring, in one process; returns the report."""
    torch.manual_seed(0)
    model = load_model(model_dir)
    fast = StreamingEngine(model)
    eager = StreamingEngine(model, decode_cpp=False)
    reference = StreamingEngine(model, fast_decode=False)
    try:
        decode_step.load()
        cpp_error = None
    except RuntimeError as error:  # no compiler: every decode line is the eager step
        cpp_error = str(error)
    text = torch.randint(0, 256, (history + bulk_tokens + 64,)).tolist()
    state = fast.append(fast.init_state(), text[:history])[0]
    greedy = SamplingParams(temperature=0, allow_eos=False, max_new_tokens=tokens)
    load_before = os.getloadavg()[0]

    def measure(name: str, items: int, fn, n: int = repeats) -> Rate:
        return Rate(name, items, time_median(fn, repeats=n, warmup=1, threads=threads))

    rates = []
    ref_params = SamplingParams(temperature=0, allow_eos=False, max_new_tokens=reference_tokens)
    rates.append(
        measure(
            "reference generate (1 session)",
            reference_tokens,
            lambda: list(reference.generate(state, [65], ref_params)),
        )
    )
    for n in sessions:
        rates.append(
            measure(
                f"decode, {n} session{'s' if n > 1 else ''}",
                n * tokens,
                lambda n=n: list(fast.decode_batch([state] * n, [[65]] * n, greedy)),
            )
        )
    rates.append(
        measure(
            "decode eager, 1 session",
            tokens,
            lambda: list(eager.decode_batch([state], [[65]], greedy)),
        )
    )
    bulk = text[history : history + bulk_tokens]
    rates.append(measure("bulk append", bulk_tokens, lambda: fast.append(state, bulk)))
    appends = {}
    model_path = {}  # the same appends on MAGModel.forward: the C++ chunk path's peer
    for size in (1, 64):
        piece = text[history : history + size]
        appends[size] = measure(f"append {size}", size, lambda p=piece: fast.append(state, p), 15)
        model_path[size] = measure(
            f"append {size}, model", size, lambda p=piece: eager.append(state, p), 15
        )
    offset = fast.append(state, text[history : history + 30])[0]  # inside a memory chunk
    stepped = {
        "64": measure("step 64", 64, lambda: fast.step_batch([state], [text[:64]]), 15),
        "50@30": measure("step 50@30", 50, lambda: fast.step_batch([offset], [text[:50]]), 15),
    }
    floor_flops = flops_per_token(model)
    gemm_rate = gemm_flops_per_s(threads)
    by_name = {r.name: r for r in rates}
    ref = by_name["reference generate (1 session)"]
    one = by_name["decode, 1 session"] if 1 in sessions else None
    report = {
        "model": str(model_dir),
        "params": model.num_params(),
        "threads": threads,
        "cpp_step": cpp_error or "built",
        "tokens_per_generation": tokens,
        "history": history,
        "load_avg": [load_before, os.getloadavg()[0]],
        "rates": [r.row() for r in rates],
        "append_ms": {str(k): 1e3 * v.timing.median_s for k, v in appends.items()},
        "append_cpu_ms": {str(k): 1e3 * v.items / v.per_cpu_s for k, v in appends.items()},
        "append_model_ms": {str(k): 1e3 * v.timing.median_s for k, v in model_path.items()},
        "step_batch_ms": {k: 1e3 * v.timing.median_s for k, v in stepped.items()},
        "flops_per_token": floor_flops,
        "gemm_gflops": gemm_rate / 1e9,
        "floor_tokens_per_s": gemm_rate / floor_flops,
    }
    if one is not None:
        bulk_rate = by_name["bulk append"].per_s
        report["ratios"] = {
            "decode1_vs_reference": one.per_s / ref.per_s,
            "decode1_vs_eager": one.per_s / by_name["decode eager, 1 session"].per_s,
            "decode1_vs_bulk": one.per_s / bulk_rate,
            **{
                f"decode{n}_vs_decode1": by_name[f"decode, {n} sessions"].per_s / one.per_s
                for n in sessions
                if n > 1
            },
        }
    return report


def format_report(report: dict) -> str:
    lines = [
        f"memsvc bench decode: {report['model']} ({report['params']:,} parameters), "
        f"{report['threads']} thread(s), {report['tokens_per_generation']} tokens per "
        f"generation after {report['history']} tokens of history; C++ step "
        f"{report['cpp_step']}; "
        f"load avg {report['load_avg'][0]:.1f} -> {report['load_avg'][1]:.1f}",
        f"{'':34s} {'tokens/s':>10s} {'per CPU-s':>10s} {'median ms':>10s} {'cpu_util':>8s}",
    ]
    for row in report["rates"]:
        lines.append(
            f"{row['name']:34s} {row['per_s']:10,.0f} {row['per_cpu_s']:10,.0f} "
            f"{row['median_ms']:10.1f} {row['cpu_util']:8.2f}"
        )
    lines.append(
        f"{'compute floor':34s} {report['floor_tokens_per_s']:10,.0f}   "
        f"({report['flops_per_token'] / 1e6:.2f} MFLOP/token at "
        f"{report['gemm_gflops']:.1f} GFLOP/s, a 512^3 GEMM)"
    )
    ms, cpu = report["append_ms"], report["append_cpu_ms"]
    lines.append(
        f"engine append: 1 token {ms['1']:.2f} ms (CPU {cpu['1']:.2f}), "
        f"64 tokens {ms['64']:.2f} ms (CPU {cpu['64']:.2f})"
    )
    model_ms = report.get("append_model_ms")
    if model_ms:  # the same appends on MAGModel.forward (no C++ chunk path)
        lines.append(
            f"  on MAGModel.forward: 1 token {model_ms['1']:.2f} ms, "
            f"64 tokens {model_ms['64']:.2f} ms (C++ chunk path "
            f"{model_ms['1'] / ms['1']:.2f}x, {model_ms['64'] / ms['64']:.2f}x faster)"
        )
    step = report["step_batch_ms"]
    lines.append(
        f"step_batch (the server's path), one session: 64 tokens {step['64']:.2f} ms, "
        f"50 tokens from chunk offset 30 {step['50@30']:.2f} ms"
    )
    if "ratios" in report:
        lines.append("ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in report["ratios"].items()))
    return "\n".join(lines)


def run_decode_command(args: argparse.Namespace) -> int:
    report = run_decode_benchmark(
        model_dir=args.model,
        tokens=args.tokens,
        reference_tokens=args.reference_tokens,
        sessions=args.sessions,
        history=args.history,
        bulk_tokens=args.bulk_tokens,
        repeats=args.repeats,
        threads=args.threads,
    )
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
