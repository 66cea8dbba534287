"""`memsvc bench dispatch`: what one small op costs from Python, TorchScript and C++ (same run).

memsvc bench dispatch                 # eager, TorchScript and ATen-from-C++ (compiles once)
memsvc bench dispatch --no-cpp        # without the C++ build (about a minute the first time)

The decoder (memsvc/model/decode.py) spends a generated token in about 170 small ops
of a (1, 128) row, where the arithmetic is a few microseconds and the per-op overhead
is most of the time. This benchmark runs one chain shaped like a decoder layer (a
(1, D) x (D, 2D) GEMM, a split, an addcmul, a sigmoid and a multiply, 20 times, then a
last GEMM: 101 ops) three ways, each checked equal to the eager result first:

- eager: PyTorch from Python, under no_grad, the decoder's way;
- TorchScript: the same function scripted, run by the C++ interpreter;
- C++: the same ATen calls from a C++ extension (`torch.utils.cpp_extension`), so no
  Python between ops: what a C++ decoder step that calls ATen op by op would pay.

It prints the median microseconds per op and each one's speed-up over eager. What it
says: the ceiling of moving the step's op-by-op calls out of Python, before writing one.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from memsvc.bench.timing import time_median

LINKS = 20  # ops per link: mm, split, addcmul, sigmoid, mul
OPS = LINKS * 5 + 1

_CPP = r"""
#include <torch/extension.h>
torch::Tensor chain(torch::Tensor x, torch::Tensor w, torch::Tensor w2, int64_t links) {
  const int64_t d = x.size(1);
  for (int64_t i = 0; i < links; ++i) {
    auto parts = torch::mm(x, w).split_with_sizes({d, d}, 1);
    x = torch::addcmul(parts[0], parts[1], x).sigmoid() * x;
  }
  return torch::mm(x, w2);
}
"""


def chain(x: Tensor, w: Tensor, w2: Tensor, links: int) -> Tensor:
    d = x.shape[1]
    for _ in range(links):
        a, b = torch.mm(x, w).split_with_sizes([d, d], dim=1)
        x = torch.addcmul(a, b, x).sigmoid() * x
    return torch.mm(x, w2)


def build_cpp() -> Callable[[Tensor, Tensor, Tensor, int], Tensor]:
    """The C++ chain, compiled on first use (cached by torch under ~/.cache)."""
    from torch.utils.cpp_extension import load_inline

    module = load_inline("memsvc_bench_dispatch", cpp_sources=_CPP, functions=["chain"])
    return module.chain


def measure(dim: int, calls: int, repeats: int, cpp: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, dim, generator=g)
    w = torch.randn(dim, 2 * dim, generator=g) / dim**0.5
    w2 = torch.randn(dim, dim, generator=g) / dim**0.5
    with warnings.catch_warnings():  # deprecated in torch 2.x; measured as one of the ways
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(chain)
    ways: dict[str, Callable[[Tensor, Tensor, Tensor, int], Tensor]] = {
        "eager": chain,
        "torchscript": scripted,
    }
    report: dict = {"dim": dim, "ops_per_call": OPS, "threads": 1}
    if cpp:
        try:
            ways["cpp"] = build_cpp()
        except Exception as error:  # no compiler or headers: say so, measure the rest
            report["cpp_unavailable"] = f"{type(error).__name__}: {error}"[:300]
    with torch.no_grad():
        want = chain(x, w, w2, LINKS)
        for name, fn in ways.items():
            torch.testing.assert_close(fn(x, w, w2, LINKS), want, msg=f"{name} differs")
    us = {}
    for name, fn in ways.items():

        def run(fn=fn) -> None:
            for _ in range(calls):
                fn(x, w, w2, LINKS)

        timing = time_median(run, repeats=repeats, warmup=2, threads=1)
        us[name] = timing.median_s / (calls * OPS) * 1e6
    report["us_per_op"] = {k: round(v, 3) for k, v in us.items()}
    report["speedup_vs_eager"] = {k: round(us["eager"] / v, 2) for k, v in us.items()}
    return report


def run_dispatch_command(args: argparse.Namespace) -> int:
    report = measure(args.dim, args.calls, args.repeats, not args.no_cpp)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"one (1, {args.dim}) op chain of {OPS} ops, 1 thread, median of {args.repeats}")
    for name, value in report["us_per_op"].items():
        speedup = report["speedup_vs_eager"][name]
        print(f"  {name:12s} {value:6.2f} us per op   {speedup:4.2f}x eager")
    if "cpp_unavailable" in report:
        print(f"  cpp          unavailable ({report['cpp_unavailable']})", file=sys.stderr)
    return 0
