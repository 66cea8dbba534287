"""memsvc.memory through kernels.lmm: NeuralMemory's chunk writes are the chunk update,
on every backend; the dispatch; the GPU benchmark's floors (tests/kernels/conftest.py
picks the device: the GPU when present, else the CPU under Triton's interpreter)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import pytest
import torch

from kernels.lmm import chunk_update, chunk_update_torch, kernel_applies
from memsvc.memory import MemoryConfig, NeuralMemory

from .test_lmm import F64, FP32, Case, make_chunk


@contextlib.contextmanager
def launches() -> Iterator[list[int]]:
    """The number of memories of every Triton chunk-update launch inside the block
    (a profile hook on the launcher's code object: nothing is patched)."""
    from kernels.lmm.triton_chunk import chunk_update_triton

    code, calls, previous = chunk_update_triton.__code__, [], sys.getprofile()

    def hook(frame, event, arg):
        if event == "call" and frame.f_code is code:
            calls.append(frame.f_locals["k"].shape[0])

    sys.setprofile(hook)
    try:
        yield calls
    finally:
        sys.setprofile(previous)


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
            out = chunk_update_torch(
                cfg.chunk_rule,
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


def test_neural_memory_stream_through_the_kernel(device):
    """NeuralMemory's own calls (heads flattened into memories, chunk slices of a longer
    call, a fresh state's shared initial weights) through the kernel, on any device, give
    the stream the PyTorch path gives."""
    torch.manual_seed(2)
    cfg = MemoryConfig(dim=32, heads=2, depth=3, chunk_size=8, expansion=2.0)
    memory = NeuralMemory(cfg, backend="torch").eval().to(device)
    x = torch.randn(2, 21, cfg.dim, device=device)
    with torch.no_grad():
        y_ref, s_ref = memory(x)
        memory.backend = "triton"
        with launches() as calls:
            y, state = memory(x[:, :5])  # a partial chunk first: chunks straddle the calls
            y2, state = memory(x[:, 5:], state)
    assert calls == [2 * cfg.heads] * 2  # one launch per whole chunk, for every stream and head
    torch.testing.assert_close(torch.cat([y, y2], dim=1), y_ref, **FP32)
    for got, want in zip(state.weights + state.momentum, s_ref.weights + s_ref.momentum,
                         strict=True):  # fmt: skip
        torch.testing.assert_close(got, want, **FP32)
    torch.testing.assert_close(state.surprise_ema, s_ref.surprise_ema, **FP32)


def test_neural_memory_backend_naive_gives_the_stream_of_the_torch_path():
    torch.manual_seed(3)
    cfg = MemoryConfig(dim=8, heads=2, depth=2, chunk_size=4, expansion=2.0)
    fast = NeuralMemory(cfg).double().eval()
    slow = NeuralMemory(cfg, backend="naive").double().eval()
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(2, 10, cfg.dim, dtype=torch.float64)
    with torch.no_grad():
        (y_fast, s_fast), (y_slow, s_slow) = fast(x), slow(x)
    torch.testing.assert_close(y_slow, y_fast, **F64)
    for got, want in zip(s_slow.weights + s_slow.momentum, s_fast.weights + s_fast.momentum,
                         strict=True):  # fmt: skip
        torch.testing.assert_close(got, want, **F64)


def test_dispatch_picks_the_reference_where_the_kernel_does_not_apply():
    setup = Case.of(dim=16, depth=2, chunk_size=8, expansion=2.0)
    chunk = make_chunk(setup, 2, 4, seed=5, device="cpu")
    assert not kernel_applies(*chunk[0], *chunk[2:5])  # CPU tensors
    auto = chunk_update(setup.rule, *chunk)
    ref = chunk_update_torch(setup.rule, *chunk)
    for a, b in zip(auto.weights + auto.momentum, ref.weights + ref.momentum, strict=True):
        assert torch.equal(a, b)
    if torch.cuda.is_available():
        weights = [w.cuda().bfloat16().requires_grad_(True) for w in chunk[0]]
        assert kernel_applies(*[w.detach() for w in weights])
        assert not kernel_applies(*weights)  # autograd through the update: reference
        with torch.no_grad():
            assert kernel_applies(*weights)
        for dtype in (torch.float32, torch.float64):  # the PyTorch path is faster / exact
            assert not kernel_applies(*[w.detach().to(dtype) for w in weights])


def test_bench_floors_count_what_a_chunk_must_move_and_multiply():
    """The GPU benchmark's floors for one depth-2 session at dim 512 (hidden 2048)."""
    from memsvc.bench.lmm_kernel import CHUNK, READS, bytes_moved, config_for, flops

    d, h, params = 512, 2048, 2 * 512 * 2048
    tokens = (2 * CHUNK + 2 * READS) * d * 4 + CHUNK * 3 * 4  # k, v, q in; reads out; gates
    assert bytes_moved(config_for(d), 1, torch.float32) == 4 * params * 4 + tokens
    assert bytes_moved(config_for(d), 3, torch.bfloat16) == 3 * (4 * params * 2 + tokens)
    forward = 2 * (CHUNK + READS) * params
    backward = 2 * CHUNK * d * h
    gram = 2 * CHUNK * CHUNK * 2 * (d + h)
    sums = 2 * 2 * CHUNK * params
    assert flops(config_for(d), 2) == 2 * (forward + backward + gram + sums)


def test_bench_correctness_check_passes_on_a_tiny_size(device):
    """The GPU benchmark's own correctness gate (kernel vs PyTorch path, ragged, both
    dtypes), at dim 16 on the test device: the moved benchmark still reaches the kernel."""
    from memsvc.bench.lmm_kernel import Blocks, check_correctness

    results = check_correctness([16], Blocks(), "ieee", dev=device.type)
    assert [r["dtype"] for r in results] == ["float32", "bfloat16"]
    assert all(r["ok"] for r in results), results
