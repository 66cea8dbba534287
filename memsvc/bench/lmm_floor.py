"""The GEMM floor of `memsvc bench lmm`: the matrix products one 64-token call of the
benchmark's memory runs, timed back to back on their own.

A call of C tokens (one stream, one head, an MLP memory of depth 2, dim d, hidden
h = expansion * d) multiplies:

- the q, k, v projection, (C, d) x (d, 3d);
- the forward of keys and queries at the chunk-start weights, one pass of 2C rows per
  layer: (2C, d) x (d, h) and (2C, h) x (h, d);
- the backward to the hidden layer, (C, d) x (d, h);
- four C x C Gram matrices (each layer's inputs and output gradients), from which the
  surprise and the update's norm come;
- the gradient sums H_l^T (G_l * w), (d, C) x (C, h) and (h, C) x (C, d): twice per layer
  for per-token momentum (the weights' and the momentum's token weights differ), once
  for `chunk_momentum` and plain SGD.

Timed alone, with nothing between them, these give the most tokens/s this chunk
algorithm can reach on this CPU, whatever is done about the elementwise work and the
dispatch around them. The benchmark prints it beside both implementations, so the
ratio to the peer that the CPU allows is read off the same run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from memsvc.bench.timing import time_median


def chunk_products(
    dim: int, expansion: float, chunk: int, optimizer: str
) -> list[tuple[Tensor, Tensor]]:
    """The (A, B) operand pairs of one call's products, as (1, m, k) x (1, k, n) batches
    laid out as the memory lays them out (transposed operands are views, as there)."""
    d, h, c = dim, int(dim * expansion), chunk

    def mat(*shape: int) -> Tensor:
        return torch.randn(1, *shape)

    keys_queries, k, hidden, g_out, g_hidden = (
        mat(2 * c, d),
        mat(c, d),
        mat(2 * c, h),
        mat(c, d),
        mat(c, h),
    )
    w1, w2 = mat(d, h), mat(h, d)
    pairs = [
        (mat(c, d), mat(3 * d, d).transpose(1, 2)),  # q, k, v projection (nn.Linear)
        (keys_queries, w1),
        (hidden, w2),
        (g_out, w2.transpose(1, 2)),
        (k, k.transpose(1, 2)),
        (hidden[:, :c], hidden[:, :c].transpose(1, 2)),
        (g_out, g_out.transpose(1, 2)),
        (g_hidden, g_hidden.transpose(1, 2)),
    ]
    sums = 2 if optimizer == "momentum" else 1
    for _ in range(sums):
        pairs.append((k.transpose(1, 2), g_hidden))  # layer 1: (d, C) x (C, h)
        pairs.append((hidden[:, :c].transpose(1, 2), g_out))  # layer 2: (h, C) x (C, d)
    return pairs


def product_flops(pairs: list[tuple[Tensor, Tensor]]) -> int:
    """2 m k n summed over the products."""
    return sum(2 * a.shape[1] * a.shape[2] * b.shape[2] for a, b in pairs)


def gemm_floor(
    dim: int,
    expansion: float,
    chunk: int,
    optimizer: str,
    repeats: int = 5,
    threads: int = 2,
    calls: int = 16,
) -> float:
    """Tokens/s if a C-token call cost only its products (median of `repeats` timings of
    `calls` calls' worth)."""
    pairs = chunk_products(dim, expansion, chunk, optimizer)

    def run() -> None:
        for _ in range(calls):
            for a, b in pairs:
                torch.bmm(a, b)

    timing = time_median(run, repeats=repeats, warmup=1, threads=threads)
    return timing.per_second(calls * chunk)
