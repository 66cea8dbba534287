"""The C++ chunk path (memsvc/model/chunk_fast.py, kernels/decode_step/chunk.cpp) held
equal to its reference, `MAGModel.forward(..., last_only=True)`: logits and every tensor
of the state, over random streams cut at random lengths, on models that take each
branch of the kernel."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kernels import decode_step
from memsvc.memory import NonFiniteStateError
from memsvc.model import MAGModel, ModelState
from memsvc.model.chunk_fast import ChunkPath, supports
from tests.model.conftest import small_config, small_model

MEMORY = small_config().memory
VARIANTS = {
    "delta, open gate": {},
    "absolute gate, adaptive forgetting": {
        "memory": replace(MEMORY, tau=0.05, adaptive_forgetting=True)
    },
    "relative gate": {"memory": replace(MEMORY, tau=1.0, gate="relative")},
    "no lookahead, no retention, one head": {
        "memory": replace(MEMORY, lookahead=False, retention="none", heads=1, conv_size=2)
    },
    "memory output projection, no attention conv": {
        "memory": replace(MEMORY, output_proj=True),
        "attn_conv_size": 0,
    },
    "no memory": {"use_memory": False},
}


@pytest.fixture(scope="module")
def cpp():
    return decode_step.load()


def assert_states_equal(got: ModelState, want: ModelState, tol: float) -> None:
    got_d, want_d = got.to_dict(), want.to_dict()
    assert got_d.keys() == want_d.keys()
    for name, value in want_d.items():
        assert got_d[name].shape == value.shape, name
        assert got_d[name].dtype == value.dtype, name
        torch.testing.assert_close(got_d[name], value, rtol=tol, atol=tol, msg=name)


def run_both(
    model: MAGModel,
    path: ChunkPath,
    lengths: list[int],
    seed: int,
    use_memory: bool = True,
    tol: float = 1e-10,
) -> ModelState:
    """Feed random tokens in pieces of `lengths` through both; compare after each."""
    g = torch.Generator().manual_seed(seed)
    state = model.init_state(1)
    with torch.no_grad():
        for n in lengths:
            tokens = torch.randint(0, model.config.vocab_size, (1, n), generator=g)
            want_logits, want = model(tokens, state, use_memory=use_memory, last_only=True)
            assert path.runs(tokens, state)
            logits, got = path.forward(tokens, state, use_memory)
            torch.testing.assert_close(logits, want_logits[:, -1], rtol=tol, atol=tol)
            assert_states_equal(got, want, tol)
            state = want
    return state


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_random_splits_match_the_model(cpp, variant: str) -> None:
    model = small_model(seed=3, **VARIANTS[variant])
    path = ChunkPath(model, cpp)
    window = model.config.window
    for seed in range(3):
        g = torch.Generator().manual_seed(100 + seed)
        # Pieces of 1 .. W tokens: the stream starts with a partly empty window and
        # crosses memory chunks at every offset.
        lengths = torch.randint(1, window + 1, (14,), generator=g).tolist()
        state = run_both(model, path, lengths, seed)
    if model.config.use_memory:  # the gate had chunks to decide on
        assert int(state.blocks[0].memory.chunks[0]) >= 10


def test_the_gate_skips_chunks_and_the_path_skips_the_same(cpp) -> None:
    model = small_model(seed=5, memory=replace(MEMORY, tau=1.0, gate="relative"))
    state = run_both(model, ChunkPath(model, cpp), [8, 3, 8, 8, 5, 7, 8, 8, 1, 8], seed=1)
    memory = state.blocks[0].memory
    assert int(memory.writes_skipped[0]) > 0 and int(memory.writes_applied[0]) > 0


def test_memory_off_leaves_the_memory_state_as_it_was(cpp) -> None:
    model = small_model(seed=1)
    path = ChunkPath(model, cpp)
    state = run_both(model, path, [5, 8, 2], seed=2)
    tokens = torch.randint(0, 256, (1, 6))
    _, after = path.forward(tokens, state, use_memory=False)
    assert after.blocks[1].memory is state.blocks[1].memory
    run_both(model, path, [5, 8, 2, 7], seed=4, use_memory=False)


def test_mitigation_knobs_reach_the_kernel(cpp) -> None:
    model = small_model(seed=2, memory=replace(MEMORY, tau=0.05, adaptive_forgetting=True))
    path = ChunkPath(model, cpp)
    state = run_both(model, path, [8, 8, 3], seed=6).with_mitigation(0.25, 0.3)
    tokens = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want_logits, want = model(tokens, state, last_only=True)
        logits, got = path.forward(tokens, state)
        _, unmitigated = path.forward(tokens, state.with_mitigation(1.0, 0.0))
    torch.testing.assert_close(logits, want_logits[:, -1], rtol=1e-10, atol=1e-10)
    assert_states_equal(got, want, 1e-10)
    gates, plain = (s.blocks[0].memory.pending_gates for s in (got, unmitigated))
    assert not torch.allclose(gates, plain)


def test_float32_matches_to_float_tolerance(cpp) -> None:
    model = small_model(seed=4, dtype=torch.float32)
    run_both(model, ChunkPath(model, cpp), [8, 1, 7, 8, 4, 8, 8, 2], seed=3, tol=2e-5)


def test_a_non_finite_write_raises_as_the_model_does(cpp) -> None:
    model = small_model(seed=0)
    path = ChunkPath(model, cpp)
    state = model.init_state(1)
    memory = state.blocks[0].memory
    poisoned = replace(memory, weights=(torch.full_like(memory.weights[0], float("nan")),))
    state = ModelState(
        state.position, (replace(state.blocks[0], memory=poisoned), *state.blocks[1:])
    )
    tokens = torch.randint(0, 256, (1, 8))
    with pytest.raises(NonFiniteStateError, match=r"weights\.0"):
        model(tokens, state, last_only=True)
    with pytest.raises(NonFiniteStateError, match=r"weights\.0"):
        path.forward(tokens, state)


def test_what_it_does_not_cover_is_refused() -> None:
    assert not supports(small_model(memory=replace(MEMORY, update_rule="chunk", depth=2)))
    model = small_model(seed=0)
    assert supports(model)
    path = ChunkPath(model, decode_step.load())
    two = ModelState.stack([model.init_state(1), model.init_state(1)])
    assert not path.runs(torch.zeros(2, 4, dtype=torch.int64), two)
    one = model.init_state(1)
    assert not path.runs(torch.zeros(1, model.config.window + 1, dtype=torch.int64), one)
    assert not path.runs(torch.zeros(1, 0, dtype=torch.int64), one)
    assert not path.runs(torch.zeros(1, 4, dtype=torch.int64), one.map(lambda t: t.float()))
