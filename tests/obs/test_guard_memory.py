"""The guard on a real NeuralMemory: a hostile stream makes the norm explode, the guard's
mitigation (applied as the session manager applies it) keeps the memory finite."""

from __future__ import annotations

import pytest
import torch

from memsvc.memory import MemoryConfig, NeuralMemory
from memsvc.memory.state import MemoryState, NonFiniteStateError
from memsvc.obs.guard import GuardConfig, GuardSample, Mitigation, SessionGuard

TOKENS = 8192
PIECE = 64  # tokens per append

# Chunked MLP memory with a step size far above what keeps it stable, and no cap on
# one chunk's update: on random tokens its norm grows by a factor of about 4 per 128
# tokens until it is no longer finite (docs/TRAINING.md).
UNSTABLE = MemoryConfig(
    dim=32, heads=1, depth=2, chunk_size=64, update_rule="chunk", max_step=5.0,
    max_update_norm=None,
)  # fmt: skip
GUARD = GuardConfig(norm_bound=1e9, window_tokens=256, recovery_tokens=1 << 20)


def hostile_tokens() -> torch.Tensor:
    """Uniformly random bytes: nothing to predict, every chunk maximally surprising."""
    return torch.randint(0, 256, (TOKENS,), generator=torch.Generator().manual_seed(0))


def stream(
    config: MemoryConfig, tokens: torch.Tensor, guard: SessionGuard | None
) -> tuple[MemoryState, list[Mitigation]]:
    torch.manual_seed(0)
    memory = NeuralMemory(config)
    embed = torch.nn.Embedding(256, config.dim)
    state = memory.init_state(1)
    mitigations = []
    with torch.no_grad():
        for start in range(0, len(tokens), PIECE):
            _, state = memory(embed(tokens[None, start : start + PIECE]), state)
            if guard is None:
                continue
            check = guard.observe(
                GuardSample(
                    position=int(state.tokens),
                    writes_applied=int(state.writes_applied),
                    writes_skipped=int(state.writes_skipped),
                    memory_norm=norm(state),
                )
            )
            if check.mitigation is not None:
                m = check.mitigation
                state = state.with_mitigation(m.step_scale, m.forget_boost)
                mitigations.append(m)
    return state, mitigations


def norm(state: MemoryState) -> float:
    return float(sum(w.detach().double().square().sum() for w in state.weights) ** 0.5)


def test_unguarded_hostile_stream_diverges():
    """The premise: without the guard this memory does not survive the stream."""
    with pytest.raises(NonFiniteStateError):
        stream(UNSTABLE, hostile_tokens(), guard=None)


def test_guard_fires_on_a_hostile_stream_and_its_mitigation_holds():
    initial = norm(NeuralMemory(UNSTABLE).init_state(1))
    state, mitigations = stream(UNSTABLE, hostile_tokens(), SessionGuard(GUARD))
    assert mitigations, "the guard never fired"
    first = mitigations[0]
    assert first.kind == "update_explosion"
    assert first.position <= 4 * GUARD.window_tokens
    assert first.evidence["norm_growth"] >= GUARD.max_norm_growth
    assert first.step_scale == 0.5
    assert all(m.kind == "update_explosion" for m in mitigations)
    # The whole stream went through, finite, with the norm held within a few decades.
    assert int(state.tokens) == TOKENS
    assert not state.non_finite()
    assert norm(state) < 1e3 * initial
    assert float(state.step_scale) == mitigations[-1].step_scale < 1.0


def test_guard_is_quiet_on_a_stable_memory():
    """The default memory (normalised step, capped update) on the same stream: no mitigation."""
    stable = MemoryConfig(dim=32, heads=1, depth=2, chunk_size=64, update_rule="chunk")
    state, mitigations = stream(stable, hostile_tokens(), SessionGuard(GUARD))
    assert mitigations == []
    assert int(state.writes_applied) == TOKENS // 64
