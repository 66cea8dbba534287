"""Split invariance, batch invariance and the state's exact tensor-dict round trip."""

from __future__ import annotations

import pytest
import torch

from memsvc.memory import MemoryState
from tests.state_asserts import assert_states_equal

from .conftest import make_memory

CONFIGS = [
    {},
    {"lookahead": True, "depth": 3},
    {"depth": 1, "update_rule": "delta", "optimizer": "sgd", "lookahead": True},
    {"tau": 1.0, "adaptive_forgetting": True, "objective": "huber"},
    {"tau": 1.0, "gate": "relative", "depth": 1, "update_rule": "delta", "optimizer": "sgd"},
]


def stream(mem, x: torch.Tensor, cuts: list[int], state=None):
    ys = []
    for a, b in zip([0, *cuts], [*cuts, x.shape[1]], strict=True):
        y, state = mem(x[:, a:b], state)
        ys.append(y)
    return torch.cat(ys, dim=1), state


@pytest.mark.parametrize("overrides", CONFIGS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_split_gives_the_same_outputs_and_state(overrides: dict, seed: int) -> None:
    mem = make_memory(seed=seed, **overrides)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 41, 16, generator=g, dtype=torch.float64)
    whole_y, whole_state = mem(x)
    n_cuts = int(torch.randint(1, 12, (1,), generator=g))
    cuts = sorted(set(torch.randint(1, 41, (n_cuts,), generator=g).tolist()))
    for split in (cuts, list(range(1, 41))):  # random pieces, then one token at a time
        y, state = stream(mem, x, split)
        torch.testing.assert_close(y, whole_y, rtol=1e-9, atol=1e-9)
        assert_states_equal(state, whole_state, rtol=1e-9, atol=1e-9)


def test_empty_call_changes_nothing() -> None:
    mem = make_memory()
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    _, state = mem(x)
    y, after = mem(x[:, :0], state)
    assert y.shape == (1, 0, 16)
    assert_states_equal(after, state, rtol=0, atol=0)


@pytest.mark.parametrize("overrides", CONFIGS)
def test_a_stream_does_not_depend_on_its_batch(overrides: dict) -> None:
    mem = make_memory(**overrides)
    x = torch.randn(3, 30, 16, dtype=torch.float64)
    batch_y, batch_state = mem(x)
    for b, alone_state in enumerate(batch_state.unstack()):
        y, state = mem(x[b : b + 1])
        torch.testing.assert_close(batch_y[b : b + 1], y, rtol=1e-12, atol=1e-12)
        assert_states_equal(alone_state, state, rtol=1e-12, atol=1e-12)


def test_stack_then_stream_equals_streaming_apart() -> None:
    mem = make_memory()
    xa, xb = torch.randn(1, 9, 16, dtype=torch.float64), torch.randn(1, 9, 16, dtype=torch.float64)
    _, sa = mem(xa)
    _, sb = mem(xb)
    more = torch.randn(2, 11, 16, dtype=torch.float64)
    y, both = mem(more, MemoryState.stack([sa, sb]))
    ya, sa2 = mem(more[:1], sa)
    yb, sb2 = mem(more[1:], sb)
    torch.testing.assert_close(y, torch.cat([ya, yb]), rtol=1e-12, atol=1e-12)
    assert_states_equal(MemoryState.stack([sa2, sb2]), both, rtol=1e-12, atol=1e-12)


def test_stack_refuses_different_pending_lengths() -> None:
    mem = make_memory()
    _, sa = mem(torch.randn(1, 5, 16, dtype=torch.float64))
    _, sb = mem(torch.randn(1, 6, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="pending"):
        MemoryState.stack([sa, sb])


@pytest.mark.parametrize("overrides", CONFIGS)
def test_state_round_trips_through_its_tensor_dict_exactly(overrides: dict) -> None:
    mem = make_memory(**overrides)
    _, state = mem(torch.randn(2, 13, 16, dtype=torch.float64))
    d = state.to_dict()
    assert all(isinstance(v, torch.Tensor) for v in d.values())
    back = MemoryState.from_dict({k: v.clone() for k, v in d.items()})
    assert_states_equal(back, state, rtol=0, atol=0)
    # and it streams on identically
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    y1, s1 = mem(x, state)
    y2, s2 = mem(x, back)
    assert torch.equal(y1, y2)
    assert_states_equal(s1, s2, rtol=0, atol=0)


def test_state_size_is_fixed_whatever_the_stream_length() -> None:
    mem = make_memory()
    sizes = set()
    state = None
    for _ in range(6):
        _, state = mem(torch.randn(1, 64, 16, dtype=torch.float64), state)
        sizes.add(state.nbytes())
    assert len(sizes) == 1
    assert int(state.tokens[0]) == 6 * 64
