"""MIRAS parts (objectives, retention, optimisers) and the seed's write gate."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.lmm.objective import MSE, Huber, Lp
from kernels.lmm.optimizer import MomentumSGD
from kernels.segsum import segsum
from memsvc.memory import MemoryConfig
from memsvc.memory.gate import WriteGate

from .conftest import make_memory


@pytest.mark.parametrize("objective", [MSE(), Huber(0.3), Huber(2.0), Lp(1.0), Lp(1.5), Lp(3.0)])
def test_objective_gradient_equals_autograd(objective) -> None:
    r = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    (auto,) = torch.autograd.grad(objective.loss(r).sum(), r)
    torch.testing.assert_close(objective.grad(r), auto, rtol=1e-12, atol=1e-12)


def test_segsum_is_the_segment_sum() -> None:
    x = torch.randn(3, 6, dtype=torch.float64)
    s = segsum(x)
    for i in range(6):
        for j in range(6):
            want = (
                x[:, j + 1 : i + 1].sum(-1)
                if j <= i
                else torch.full((3,), -math.inf, dtype=x.dtype)
            )
            torch.testing.assert_close(s[:, i, j], want)


def test_momentum_coefficients_follow_the_recurrence() -> None:
    """Run S_i = eta_i S - theta_i u_i, M_i = a_i M + S on scalars and compare."""
    g = torch.Generator().manual_seed(0)
    theta, eta, alpha = (torch.rand(2, 5, generator=g, dtype=torch.float64) for _ in range(3))
    u = torch.randn(2, 5, dtype=torch.float64, generator=g)
    m0, s0 = torch.randn(2, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    m, s = m0.clone(), s0.clone()
    for i in range(5):
        s = eta[:, i] * s - theta[:, i] * u[:, i]
        m = (1 - alpha[:, i]) * m + s
    c = MomentumSGD().coefficients(theta, eta, alpha)
    torch.testing.assert_close(c.beta * m0 + c.c * s0 - (c.w * u).sum(-1), m)
    torch.testing.assert_close(c.e * s0 - (c.ws * u).sum(-1), s)


def gate(**kw) -> WriteGate:
    return WriteGate.from_config(MemoryConfig(dim=8, **kw))


def test_gate_formula_as_documented() -> None:
    g = gate(tau=0.5, surprise_beta=0.8, adaptive_forgetting=True, lambda_0=1e-4, lambda_max=1e-2)
    d = g.decide(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.5]), torch.tensor([1.0, 0.02]))
    torch.testing.assert_close(d.surprise_ema, torch.tensor([0.2, 0.8]))
    assert d.write.tolist() == [False, True]
    torch.testing.assert_close(d.write_rate, torch.tensor([0.9, 0.9 * 0.02 + 0.1]))
    want = [min(1e-2, 1e-4 / 0.9), min(1e-2, 1e-4 / (0.9 * 0.02 + 0.1))]
    torch.testing.assert_close(d.forget, torch.tensor(want))


def test_relative_gate_compares_the_chunk_with_the_ema_before_it() -> None:
    g = gate(tau=1.5, gate="relative", surprise_beta=0.5)
    surprise, ema = torch.tensor([1.0, 2.0, 3.1, 0.1]), torch.tensor([1.0, 1.0, 2.0, 0.0])
    d = g.decide(surprise, ema, torch.ones(4))
    assert d.write.tolist() == [False, True, True, True]  # 1 < 1.5, 2 > 1.5, 3.1 > 3, vs 0
    torch.testing.assert_close(d.surprise_ema, torch.tensor([1.0, 1.5, 2.55, 0.05]))


def test_relative_gate_writes_a_spike_and_skips_steady_filler() -> None:
    g, ema, writes = gate(tau=1.2, gate="relative"), torch.zeros(1), []
    for s in [1.0] * 20 + [5.0] + [1.0] * 5:
        d = g.decide(torch.tensor([s]), ema, torch.ones(1))
        ema = d.surprise_ema
        writes.append(bool(d.write))
    assert writes[0] and writes[20]  # the first chunk (against 0) and the spike
    assert not any(writes[10:20]) and not any(writes[21:])  # the EMA is near 1 by then


def test_lambda_grows_as_writes_get_sparse_and_is_capped() -> None:
    g = gate(tau=0.5, adaptive_forgetting=True, lambda_0=1e-4, lambda_max=1e-3)
    rate = torch.ones(1)
    lams = []
    for _ in range(60):  # nothing surprising: every chunk skipped
        d = g.decide(torch.zeros(1), torch.zeros(1), rate)
        rate = d.write_rate
        lams.append(float(d.forget))
    assert lams == sorted(lams)
    assert lams[0] == pytest.approx(1e-4 / 0.9)
    assert lams[-1] == pytest.approx(1e-3)


def test_tau_zero_always_writes_even_with_zero_surprise() -> None:
    d = gate(tau=0.0).decide(torch.zeros(3), torch.zeros(3), torch.ones(3))
    assert d.write.all()


def test_high_tau_writes_nothing_and_the_counters_say_so() -> None:
    mem = make_memory(tau=1e6)
    x = torch.randn(2, 4 * 6 + 1, 16, dtype=torch.float64)
    _, state = mem(x)
    fresh = mem.init_state(2, dtype=torch.float64)
    for w, w0 in zip(state.weights, fresh.weights, strict=True):
        assert torch.equal(w, w0)
    for s in state.momentum:
        assert not s.any()
    assert state.writes_applied.tolist() == [0, 0]
    assert state.writes_skipped.tolist() == [6, 6]
    assert state.chunks.tolist() == [6, 6]
    assert state.tokens.tolist() == [25, 25]
    assert (state.surprise_ema > 0).all()


def test_no_retention_keeps_the_weights_scale() -> None:
    mem = make_memory(retention="none", optimizer="sgd", tau=1e6)
    _, state = mem(torch.randn(1, 8, 16, dtype=torch.float64))
    assert torch.equal(state.weights[0], mem.init_state(1, dtype=torch.float64).weights[0])


def test_adaptive_forgetting_shrinks_written_weights() -> None:
    base = make_memory(seed=3, retention="none", optimizer="sgd")
    forget = make_memory(
        seed=3,
        retention="none",
        optimizer="sgd",
        adaptive_forgetting=True,
        lambda_0=0.1,
        lambda_max=0.5,
    )
    x = torch.randn(1, 4, 16, dtype=torch.float64)
    _, a = base(x)
    _, b = forget(x)
    for wa, wb in zip(a.weights, b.weights, strict=True):
        torch.testing.assert_close(wb, (1 - 0.1 / 1.0) * wa)


def test_config_rejects_impossible_combinations() -> None:
    with pytest.raises(ValueError, match="depth 1"):
        MemoryConfig(dim=8, update_rule="delta", optimizer="sgd", depth=2)
    with pytest.raises(ValueError, match="heads must divide"):
        MemoryConfig(dim=10, heads=3)
    with pytest.raises(ValueError, match="depth"):
        MemoryConfig(dim=8, depth=13)
    with pytest.raises(ValueError, match="unknown"):
        MemoryConfig.from_dict({"dim": 8, "widht": 3})
    assert MemoryConfig.from_dict(MemoryConfig(dim=8, heads=2).to_dict()) == MemoryConfig(
        dim=8, heads=2
    )


def test_relative_gate_trains_straight_through_and_forwards_unchanged() -> None:
    """In training the relative gate's forward is the hard gate, and a skipped chunk's
    inputs still get a gradient (the soft share of its update, straight through)."""
    mem = make_memory(
        depth=1, update_rule="delta", optimizer="sgd", tau=50.0, gate="relative", seed=4
    )
    x = torch.randn(1, 4 * 4, 16, dtype=torch.float64, requires_grad=True)  # 4 chunks of 4
    grads = {}
    for training in (False, True):
        mem.train(training)
        _, state = mem(x)
        assert state.writes_skipped.tolist() == [3]  # the first chunk (vs an EMA of 0) only
        (grad,) = torch.autograd.grad(state.weights[0].sum(), x)
        grads[training] = grad
        if not training:
            hard = state.weights[0].detach()
        else:
            torch.testing.assert_close(state.weights[0].detach(), hard, rtol=0, atol=0)
    skipped = slice(5, 16)  # tokens that only the skipped chunks write (lookahead aside)
    assert not grads[False][:, skipped].any()
    assert grads[True][:, skipped].abs().sum() > 0


def test_gate_fields_added_later_leave_earlier_configs_and_hashes_unchanged() -> None:
    plain = MemoryConfig(dim=8)
    assert "gate" not in plain.to_dict() and "gate_softness" not in plain.to_dict()
    relative = MemoryConfig(dim=8, tau=1.0, gate="relative", gate_softness=0.2)
    data = relative.to_dict()
    assert data["gate"] == "relative" and data["gate_softness"] == 0.2
    assert MemoryConfig.from_dict(data) == relative
    assert MemoryConfig.from_dict(plain.to_dict()) == plain
