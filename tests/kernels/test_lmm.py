"""kernels.lmm: every path of the chunk update held equal to the reference on random
inputs: the PyTorch path to the naive one (float64), the Triton kernel to the PyTorch
path (tests/kernels/conftest.py picks the device: the GPU when present, else the CPU
under Triton's interpreter)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from kernels.lmm import ChunkRule, chunk_update, chunk_update_naive, chunk_update_torch

FP32 = {"rtol": 1e-4, "atol": 1e-5}
F64 = {"rtol": 1e-9, "atol": 1e-10}
# bfloat16 weights: one rounding of the new weights (2^-8 relative) and bfloat16 matmul
# operands; surprise and reads carry the operands' rounding through the MLP.
BF16_WEIGHTS = {"rtol": 2e-2, "atol": 2e-2}
BF16_SUMMARIES = {"rtol": 5e-2, "atol": 5e-2}


SHAPE_KEYS = ("dim", "depth", "chunk_size", "expansion")


@dataclass(frozen=True)
class Case:
    """A chunk update's rule and sizes: one memory of `depth` layers over dim-wide keys."""

    rule: ChunkRule
    dim: int
    depth: int = 2
    chunk_size: int = 8
    expansion: float = 4.0

    @staticmethod
    def of(**kw) -> Case:
        sizes = {k: kw.pop(k) for k in SHAPE_KEYS if k in kw}
        return Case(rule=ChunkRule(**kw), **sizes)

    def layer_shapes(self) -> list[tuple[int, int]]:
        d, h = self.dim, max(1, round(self.dim * self.expansion))
        if self.depth == 1:
            return [(d, d)]
        return [(d, h)] + [(h, h)] * (self.depth - 2) + [(h, d)]


def make_chunk(case: Case, batch: int, reads: int, seed: int, device, dtype=torch.float32):
    """Random weights (every layer non-zero), momentum, unit keys, values, gates, queries."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=g)

    shapes = case.layer_shapes()
    weights = [
        randn(batch, i, o, scale=1.0 if l == 0 else i**-0.5) for l, (i, o) in enumerate(shapes)
    ]
    momentum = [randn(batch, i, o, scale=0.1) for i, o in shapes] if case.rule.has_momentum else []
    c, d = case.chunk_size, case.dim
    k = F.normalize(randn(batch, c, d), dim=-1)
    q = F.normalize(randn(batch, reads, d), dim=-1) if reads else None
    v = randn(batch, c, d)
    u = torch.rand(batch, c, 3, generator=g)
    gates = torch.stack([u[..., 0], 0.95 * u[..., 1], 0.5 * u[..., 2]], dim=-1)

    def put(x: torch.Tensor) -> torch.Tensor:
        return x.to(device)

    return (
        [put(w).to(dtype) for w in weights],
        [put(s).to(dtype) for s in momentum],
        put(k),
        put(v),
        put(gates),
        None if q is None else put(q),
    )


def assert_same(kernel, reference, weights_tol, summaries_tol):
    for got, want in zip(
        kernel.weights + kernel.momentum, reference.weights + reference.momentum, strict=True
    ):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got.double(), want.double(), **weights_tol)
    torch.testing.assert_close(
        kernel.surprise_sq.double(), reference.surprise_sq.double(), **summaries_tol
    )
    assert (kernel.reads is None) == (reference.reads is None)
    if reference.reads is not None:
        torch.testing.assert_close(kernel.reads.double(), reference.reads.double(), **summaries_tol)


CASES = {
    "depth2-momentum": dict(depth=2),
    "depth3-momentum": dict(depth=3),
    "depth1-momentum": dict(depth=1),
    "depth2-sgd": dict(depth=2, optimizer="sgd"),
    "depth3-sgd": dict(depth=3, optimizer="sgd"),
    "depth2-chunk-momentum": dict(depth=2, optimizer="chunk_momentum"),
    "depth3-chunk-momentum": dict(depth=3, optimizer="chunk_momentum"),
    "huber": dict(depth=2, objective="huber", huber_delta=0.3),
    "lp": dict(depth=3, objective="lp", lp_p=1.5),
    "silu": dict(depth=3, activation="silu"),
    "tight-update-cap": dict(depth=2, max_update_norm=0.05),
    "no-normalizer-no-cap": dict(depth=2, normalize_step=False, max_update_norm=None),
    "odd-sizes": dict(dim=24, depth=2, chunk_size=12, expansion=3.0),
}


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference_float32(case, device):
    setup = Case.of(**{"dim": 16, "chunk_size": 8, "expansion": 4.0, **CASES[case]})
    batch, reads = 3, 5 if case == "odd-sizes" else setup.chunk_size
    chunk = make_chunk(setup, batch, reads, seed=len(case), device=device)
    got = chunk_update(setup.rule, *chunk, backend="triton")
    want = chunk_update_torch(setup.rule, *chunk)
    assert_same(got, want, FP32, FP32)


@pytest.mark.parametrize("case", CASES)
def test_torch_path_matches_naive_float64(case):
    """The matrix-product form equals autograd per token and the recurrences as written."""
    setup = Case.of(**{"dim": 16, "chunk_size": 8, "expansion": 4.0, **CASES[case]})
    chunk = make_chunk(setup, 2, 5, seed=len(case), device="cpu", dtype=torch.float64)
    chunk = tuple(x if x is None or isinstance(x, list) else x.double() for x in chunk)
    got = chunk_update(setup.rule, *chunk, backend="torch")
    want = chunk_update(setup.rule, *chunk, backend="naive")
    assert_same(got, want, F64, F64)


def test_ragged_torch_path_matches_naive():
    setup = Case.of(dim=8, depth=3, chunk_size=6, expansion=2.0, optimizer="chunk_momentum")
    chunk = make_chunk(setup, 3, 2, seed=4, device="cpu", dtype=torch.float64)
    chunk = tuple(x if x is None or isinstance(x, list) else x.double() for x in chunk)
    n_valid = torch.tensor([6, 0, 2])
    got = chunk_update_torch(setup.rule, *chunk, n_valid=n_valid)
    want = chunk_update_naive(setup.rule, *chunk, n_valid=n_valid)
    assert_same(got, want, F64, F64)


def test_unknown_backend_is_refused():
    setup = Case.of(dim=8)
    with pytest.raises(ValueError, match="unknown backend"):
        chunk_update(setup.rule, *make_chunk(setup, 1, 0, seed=0, device="cpu"), backend="cuda")


@pytest.mark.parametrize("depth", [2, 3])
def test_kernel_matches_reference_bfloat16(depth, device):
    setup = Case.of(dim=32, depth=depth, chunk_size=16, expansion=2.0)
    chunk = make_chunk(setup, 2, 16, seed=depth, device=device, dtype=torch.bfloat16)
    got = chunk_update(setup.rule, *chunk, backend="triton")
    want = chunk_update_torch(setup.rule, *chunk)
    assert got.weights[0].dtype == torch.bfloat16
    assert_same(got, want, BF16_WEIGHTS, BF16_SUMMARIES)


@pytest.mark.parametrize(
    ("depth", "optimizer"), [(2, "momentum"), (3, "momentum"), (3, "chunk_momentum")]
)
def test_ragged_batch_of_partial_chunks(depth, optimizer, device):
    """Each memory writes its own number of tokens; 0 leaves it exactly as it was."""
    setup = Case.of(dim=16, depth=depth, chunk_size=16, expansion=2.0, optimizer=optimizer)
    chunk = make_chunk(setup, 4, 3, seed=7, device=device)
    n_valid = torch.tensor([16, 5, 0, 1], device=device)
    got = chunk_update(setup.rule, *chunk, n_valid=n_valid, backend="triton")
    want = chunk_update_torch(setup.rule, *chunk, n_valid=n_valid)
    assert_same(got, want, FP32, FP32)
    weights, momentum = chunk[0], chunk[1]
    for new, old in zip(got.weights + got.momentum, weights + momentum, strict=True):
        assert torch.equal(new[2], old[2])
    assert float(got.surprise_sq[2]) == 0.0


def test_partial_chunk_is_a_shorter_chunk(device):
    """A memory writing n of C tokens gets what a chunk of exactly those n tokens gives."""
    setup = Case.of(dim=16, depth=2, chunk_size=16, expansion=2.0)
    rule = setup.rule
    weights, momentum, k, v, gates, _ = make_chunk(setup, 2, 0, seed=3, device=device)
    got = chunk_update(
        rule, weights, momentum, k, v, gates, n_valid=torch.tensor([9, 9]), backend="triton"
    )
    short = chunk_update(
        rule, weights, momentum, k[:, :9], v[:, :9], gates[:, :9], backend="triton"
    )
    assert_same(got, short, FP32, FP32)


def test_batch_invariance(device):
    """A memory's result does not depend on what it was batched with."""
    setup = Case.of(dim=16, depth=2, chunk_size=8, expansion=4.0)
    chunk = make_chunk(setup, 4, 8, seed=11, device=device)
    n_valid = torch.tensor([8, 6, 8, 3], device=device)
    batched = chunk_update(setup.rule, *chunk, n_valid=n_valid, backend="triton")
    weights, momentum, k, v, gates, q = chunk
    for i in (0, 3):
        alone = chunk_update(
            setup.rule,
            [w[i : i + 1] for w in weights],
            [s[i : i + 1] for s in momentum],
            k[i : i + 1],
            v[i : i + 1],
            gates[i : i + 1],
            q[i : i + 1],
            n_valid=n_valid[i : i + 1],
            backend="triton",
        )
        for a, b in zip(
            alone.weights + alone.momentum, batched.weights + batched.momentum, strict=True
        ):
            assert torch.equal(a[0], b[i])
        assert torch.equal(alone.reads[0], batched.reads[i])
        assert torch.equal(alone.surprise_sq[0], batched.surprise_sq[i])
