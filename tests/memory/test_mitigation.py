"""The mitigation knobs: step_scale scales theta_t, forget_boost raises alpha_t, per stream,
exactly as a memory configured that way; neutral knobs change nothing."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
from torch import Tensor

from memsvc.memory import MemoryState, NeuralMemory
from memsvc.memory.retention import L2Decay
from tests.state_asserts import assert_states_equal

from .conftest import make_memory

CONFIGS = [{}, {"depth": 1, "update_rule": "delta", "optimizer": "sgd", "lookahead": True}]


@dataclass(frozen=True)
class BoostedDecay:
    """The reference: L2 retention that forgets `boost` more, written out directly."""

    inner: L2Decay
    boost: float

    def forget(self, logits: Tensor) -> Tensor:
        return 1.0 - (1.0 - self.inner.forget(logits)) * (1.0 - self.boost)


def _twin(mem: NeuralMemory, **config) -> NeuralMemory:
    twin = NeuralMemory(replace(mem.config, **config)).to(torch.float64)
    twin.load_state_dict(mem.state_dict())
    return twin


@pytest.mark.parametrize("overrides", CONFIGS)
def test_step_scale_equals_a_smaller_maximum_step(overrides: dict) -> None:
    mem = make_memory(seed=3, **overrides)
    x = torch.randn(2, 23, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    state = mem.init_state(2, dtype=torch.float64).with_mitigation(0.25, 0.0)
    y, out = mem(x, state)
    ref_y, ref = _twin(mem, max_step=mem.config.max_step * 0.25)(x)
    torch.testing.assert_close(y, ref_y, rtol=1e-10, atol=1e-10)
    assert_states_equal(out, replace(ref, step_scale=out.step_scale), rtol=1e-10, atol=1e-10)
    assert (out.step_scale == 0.25).all()  # the knob is carried forward


@pytest.mark.parametrize("overrides", CONFIGS)
def test_forget_boost_equals_stronger_retention(overrides: dict) -> None:
    mem = make_memory(seed=4, **overrides)
    x = torch.randn(1, 19, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y, out = mem(x, mem.init_state(1, dtype=torch.float64).with_mitigation(1.0, 0.05))
    twin = _twin(mem)
    twin.retention = BoostedDecay(twin.retention, 0.05)
    ref_y, ref = twin(x)
    torch.testing.assert_close(y, ref_y, rtol=1e-10, atol=1e-10)
    assert_states_equal(out, replace(ref, forget_boost=out.forget_boost), rtol=1e-10, atol=1e-10)


def test_knobs_are_per_stream() -> None:
    mem = make_memory(seed=5)
    x = torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    calm = mem.init_state(1, dtype=torch.float64).with_mitigation(0.5, 0.1)
    plain = mem.init_state(1, dtype=torch.float64)
    y, _ = mem(x, MemoryState.stack([calm, plain]))
    alone_calm, _ = mem(x[:1], calm)
    alone_plain, _ = mem(x[1:], plain)
    torch.testing.assert_close(y, torch.cat([alone_calm, alone_plain]), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(alone_calm, mem(x[:1])[0])


@pytest.mark.parametrize(("scale", "boost"), [(0.0, 0.0), (1.5, 0.0), (1.0, 1.0), (1.0, -0.1)])
def test_out_of_range_knobs_are_refused(scale: float, boost: float) -> None:
    state = make_memory().init_state(1, dtype=torch.float64)
    with pytest.raises(ValueError, match="must be in"):
        state.with_mitigation(scale, boost)


def test_a_state_dict_without_knobs_loads_unmitigated() -> None:
    state = make_memory().init_state(2, dtype=torch.float64)
    data = state.to_dict()
    del data["step_scale"], data["forget_boost"]
    loaded = MemoryState.from_dict(data)
    assert (loaded.step_scale == 1).all() and (loaded.forget_boost == 0).all()
