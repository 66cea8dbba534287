"""kernels.lmm: the Triton chunk update held equal to the PyTorch reference, and the
reference held equal to what memsvc.memory computes (tests/kernels/conftest.py picks
the device: the GPU when present, else the CPU under Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.lmm import chunk_update, chunk_update_reference, kernel_applies
from memsvc.memory import MemoryConfig, NeuralMemory

FP32 = {"rtol": 1e-4, "atol": 1e-5}
# bfloat16 weights: one rounding of the new weights (2^-8 relative) and bfloat16 matmul
# operands; surprise and reads carry the operands' rounding through the MLP.
BF16_WEIGHTS = {"rtol": 2e-2, "atol": 2e-2}
BF16_SUMMARIES = {"rtol": 5e-2, "atol": 5e-2}


def make_chunk(
    config: MemoryConfig, batch: int, reads: int, seed: int, device, dtype=torch.float32
):
    """Random weights (every layer non-zero), momentum, unit keys, values, gates, queries."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=g)

    shapes = config.layer_shapes()
    weights = [
        randn(batch, i, o, scale=1.0 if l == 0 else i**-0.5) for l, (i, o) in enumerate(shapes)
    ]
    momentum = [randn(batch, i, o, scale=0.1) for i, o in shapes] if config.has_momentum else []
    c, d = config.chunk_size, config.head_dim
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
        torch.testing.assert_close(got.float(), want.float(), **weights_tol)
    torch.testing.assert_close(kernel.surprise_sq, reference.surprise_sq.float(), **summaries_tol)
    assert (kernel.reads is None) == (reference.reads is None)
    if reference.reads is not None:
        torch.testing.assert_close(kernel.reads, reference.reads.float(), **summaries_tol)


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
    cfg = MemoryConfig(**{"dim": 16, "chunk_size": 8, "expansion": 4.0, **CASES[case]})
    batch, reads = 3, 5 if case == "odd-sizes" else cfg.chunk_size
    chunk = make_chunk(cfg, batch, reads, seed=len(case), device=device)
    got = chunk_update(cfg, *chunk, backend="triton")
    want = chunk_update_reference(cfg, *chunk)
    assert_same(got, want, FP32, FP32)


@pytest.mark.parametrize("depth", [2, 3])
def test_kernel_matches_reference_bfloat16(depth, device):
    cfg = MemoryConfig(dim=32, depth=depth, chunk_size=16, expansion=2.0)
    chunk = make_chunk(cfg, 2, 16, seed=depth, device=device, dtype=torch.bfloat16)
    got = chunk_update(cfg, *chunk, backend="triton")
    want = chunk_update_reference(cfg, *chunk)
    assert got.weights[0].dtype == torch.bfloat16
    assert_same(got, want, BF16_WEIGHTS, BF16_SUMMARIES)


@pytest.mark.parametrize(
    ("depth", "optimizer"), [(2, "momentum"), (3, "momentum"), (3, "chunk_momentum")]
)
def test_ragged_batch_of_partial_chunks(depth, optimizer, device):
    """Each memory writes its own number of tokens; 0 leaves it exactly as it was."""
    cfg = MemoryConfig(dim=16, depth=depth, chunk_size=16, expansion=2.0, optimizer=optimizer)
    chunk = make_chunk(cfg, 4, 3, seed=7, device=device)
    n_valid = torch.tensor([16, 5, 0, 1], device=device)
    got = chunk_update(cfg, *chunk, n_valid=n_valid, backend="triton")
    want = chunk_update_reference(cfg, *chunk, n_valid=n_valid)
    assert_same(got, want, FP32, FP32)
    weights, momentum = chunk[0], chunk[1]
    for new, old in zip(got.weights + got.momentum, weights + momentum, strict=True):
        assert torch.equal(new[2], old[2])
    assert float(got.surprise_sq[2]) == 0.0


def test_partial_chunk_is_a_shorter_chunk(device):
    """A memory writing n of C tokens gets what a chunk of exactly those n tokens gives."""
    cfg = MemoryConfig(dim=16, depth=2, chunk_size=16, expansion=2.0)
    weights, momentum, k, v, gates, _ = make_chunk(cfg, 2, 0, seed=3, device=device)
    got = chunk_update(
        cfg, weights, momentum, k, v, gates, n_valid=torch.tensor([9, 9]), backend="triton"
    )
    short = chunk_update(cfg, weights, momentum, k[:, :9], v[:, :9], gates[:, :9], backend="triton")
    assert_same(got, short, FP32, FP32)


def test_batch_invariance(device):
    """A memory's result does not depend on what it was batched with."""
    cfg = MemoryConfig(dim=16, depth=2, chunk_size=8, expansion=4.0)
    chunk = make_chunk(cfg, 4, 8, seed=11, device=device)
    n_valid = torch.tensor([8, 6, 8, 3], device=device)
    batched = chunk_update(cfg, *chunk, n_valid=n_valid, backend="triton")
    weights, momentum, k, v, gates, q = chunk
    for i in (0, 3):
        alone = chunk_update(
            cfg,
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


@pytest.mark.parametrize("config", [dict(heads=1), dict(heads=2, output_proj=False)])
def test_reference_is_what_neural_memory_computes(config):
    """Two chunks through NeuralMemory equal the reference applied chunk by chunk to the
    same projected keys, values, gates and queries (weights, momentum, reads, surprise)."""
    torch.manual_seed(0)
    cfg = MemoryConfig(dim=16, depth=2, chunk_size=8, expansion=2.0, **config)
    memory = NeuralMemory(cfg).eval()
    with torch.no_grad():
        for w in memory.initial_weights:
            w.normal_(std=0.5)
        memory.to_gates.weight.normal_(std=0.3)
    b, c, h = 2, cfg.chunk_size, cfg.heads
    x = torch.randn(b, 2 * c, cfg.dim)
    with torch.no_grad():
        y, state = memory(x)
        fresh = memory.init_state(b)
        proj, _, _ = memory.project(x, fresh)
        weights = [w.reshape(b * h, *w.shape[2:]) for w in fresh.weights]
        momentum = [s.reshape(b * h, *s.shape[2:]) for s in fresh.momentum]
        reads, ema = [], torch.zeros(b)
        for start in (0, c):
            span = slice(start, start + c)
            out = chunk_update_reference(
                cfg,
                weights,
                momentum,
                proj.k[:, span],
                proj.v[:, span],
                proj.gates[:, span],
                proj.q[:, span],
            )
            weights, momentum = out.weights, out.momentum
            reads.append(out.reads)
            surprise = out.surprise_sq.view(b, h).sum(-1).sqrt()
            ema = cfg.surprise_beta * ema + (1 - cfg.surprise_beta) * surprise
    for got, want in zip(state.weights + state.momentum, weights + momentum, strict=True):
        torch.testing.assert_close(got.reshape(want.shape), want, rtol=0, atol=0)
    y_ref = torch.cat(reads, dim=1).view(b, h, 2 * c, -1).transpose(1, 2).reshape(b, 2 * c, -1)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(state.surprise_ema, ema, **FP32)


def test_neural_memory_on_the_device_matches_the_reference(device):
    """memsvc.memory's stream on the test device (on CUDA: through the kernel) equals the
    same stream on the CPU (the PyTorch path), weights and outputs."""
    torch.manual_seed(1)
    cfg = MemoryConfig(dim=32, heads=2, depth=2, chunk_size=16, expansion=2.0)
    memory = NeuralMemory(cfg).eval()
    with torch.no_grad():
        memory.initial_weights[1].normal_(std=0.2)
    x = torch.randn(3, 40, cfg.dim)  # two whole chunks and a partial one
    with torch.no_grad():
        y_cpu, s_cpu = memory(x)
        y_dev, s_dev = memory.to(device)(x.to(device))
    torch.testing.assert_close(y_dev.cpu(), y_cpu, **FP32)
    for got, want in zip(
        s_dev.weights + s_dev.momentum, s_cpu.weights + s_cpu.momentum, strict=True
    ):
        torch.testing.assert_close(got.cpu(), want, **FP32)


def test_neural_memory_stream_through_the_kernel(device, monkeypatch):
    """NeuralMemory's own calls (heads flattened into memories, chunk slices of a longer
    call, a fresh state's shared initial weights) through the kernel, on any device, give
    the stream the PyTorch path gives."""
    import memsvc.memory.neural_memory as neural_memory

    torch.manual_seed(2)
    cfg = MemoryConfig(dim=32, heads=2, depth=3, chunk_size=8, expansion=2.0)
    memory = NeuralMemory(cfg).eval().to(device)
    x = torch.randn(2, 21, cfg.dim, device=device)
    with torch.no_grad():
        y_ref, s_ref = memory(x)

        calls = []

        def kernel_write(config, arch, objective, optimizer, weights, momentum, k, v, gates, q):
            calls.append(k.shape[0])
            return chunk_update(config, weights, momentum, k, v, gates, q, backend="triton")

        monkeypatch.setattr(neural_memory, "chunk_write", kernel_write)
        monkeypatch.setattr(neural_memory, "fused_chunk_write", kernel_write)
        y, state = memory(x[:, :5])  # a partial chunk first: chunks straddle the calls
        y2, state = memory(x[:, 5:], state)
    assert calls == [2 * cfg.heads] * 2  # one launch per whole chunk, for every stream and head
    torch.testing.assert_close(torch.cat([y, y2], dim=1), y_ref, **FP32)
    for got, want in zip(state.weights + state.momentum, s_ref.weights + s_ref.momentum,
                         strict=True):  # fmt: skip
        torch.testing.assert_close(got, want, **FP32)
    torch.testing.assert_close(state.surprise_ema, s_ref.surprise_ema, **FP32)


def test_dispatch_picks_the_reference_where_the_kernel_does_not_apply():
    cfg = MemoryConfig(dim=16, depth=2, chunk_size=8, expansion=2.0)
    chunk = make_chunk(cfg, 2, 4, seed=5, device="cpu")
    assert not kernel_applies(cfg, chunk[0], *chunk[2:5])  # CPU tensors
    auto = chunk_update(cfg, *chunk)
    ref = chunk_update_reference(cfg, *chunk)
    for a, b in zip(auto.weights + auto.momentum, ref.weights + ref.momentum, strict=True):
        assert torch.equal(a, b)
    if torch.cuda.is_available():
        weights = [w.cuda().requires_grad_(True) for w in chunk[0]]
        assert kernel_applies(cfg, [w.detach() for w in weights])
        assert not kernel_applies(cfg, weights)  # autograd through the update: reference
        with torch.no_grad():
            assert kernel_applies(cfg, weights)
        double = [w.detach().double() for w in weights]
        assert not kernel_applies(cfg, double)


def test_bench_floors_count_what_a_chunk_must_move_and_multiply():
    """The GPU benchmark's floors for one depth-2 session at dim 512 (hidden 2048)."""
    from kernels.lmm.bench import CHUNK, READS, bytes_moved, config_for, flops

    d, h, params = 512, 2048, 2 * 512 * 2048
    tokens = (2 * CHUNK + 2 * READS) * d * 4 + CHUNK * 3 * 4  # k, v, q in; reads out; gates
    assert bytes_moved(config_for(d), 1, torch.float32) == 4 * params * 4 + tokens
    assert bytes_moved(config_for(d), 3, torch.bfloat16) == 3 * (4 * params * 2 + tokens)
    forward = 2 * (CHUNK + READS) * params
    backward = 2 * CHUNK * d * h
    gram = 2 * CHUNK * CHUNK * 2 * (d + h)
    sums = 2 * 2 * CHUNK * params
    assert flops(config_for(d), 2) == 2 * (forward + backward + gram + sums)
