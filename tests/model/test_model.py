"""MAGModel: training (one call) == streaming (any split), state layout and batching,
the memory ablations."""

from __future__ import annotations

import pytest
import torch

from memsvc.memory import MemoryConfig
from memsvc.model import MAGModel, ModelConfig, ModelState
from tests.state_asserts import assert_states_equal

from .conftest import small_model

TOL = {"rtol": 1e-9, "atol": 1e-9}


def stream(model, tokens, cuts, state=None, **kw):
    outs = []
    for a, b in zip([0, *cuts], [*cuts, tokens.shape[1]], strict=True):
        logits, state = model(tokens[:, a:b], state, **kw)
        outs.append(logits)
    return torch.cat(outs, dim=1), state


MEMORIES = [
    {},
    {"memory_residual": False},
    {  # the deep MLP memory with momentum and the chunk-start update
        "memory": MemoryConfig(dim=32, heads=2, depth=2, expansion=2.0, chunk_size=4),
    },
]


@pytest.mark.parametrize("overrides", MEMORIES)
def test_any_split_gives_the_same_logits_and_state(overrides: dict) -> None:
    model = small_model(0, **overrides)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 260, (2, 45), generator=g)
    whole, whole_state = model(tokens)
    assert whole.shape == (2, 45, 260)
    for cuts in ([3, 4, 8, 9, 20, 33], list(range(1, 45)), [16]):
        logits, state = stream(model, tokens, cuts)
        torch.testing.assert_close(logits, whole, **TOL)
        assert_states_equal(state, whole_state, **TOL)
    assert whole_state.position.tolist() == [45, 45]


@pytest.mark.parametrize("overrides", MEMORIES)
@pytest.mark.parametrize("use_memory", [True, False])
def test_last_only_gives_the_last_logits_and_the_same_state(
    overrides: dict, use_memory: bool
) -> None:
    model = small_model(1, **overrides)
    tokens = torch.randint(0, 260, (3, 21), generator=torch.Generator().manual_seed(1))
    _, state = model(tokens[:, :6])
    whole, whole_state = model(tokens[:, 6:], state, use_memory=use_memory)
    last, last_state = model(tokens[:, 6:], state, use_memory=use_memory, last_only=True)
    assert last.shape == (3, 1, 260)
    torch.testing.assert_close(last, whole[:, -1:], **TOL)
    assert_states_equal(last_state, whole_state, **TOL)
    for length in (1, 3):  # a fresh stream, shorter than the window: cache slots not real
        whole, whole_state = model(tokens[:, :length], None, use_memory=use_memory)
        last, last_state = model(tokens[:, :length], None, use_memory, last_only=True)
        torch.testing.assert_close(last, whole[:, -1:], **TOL)
        assert_states_equal(last_state, whole_state, **TOL)


def test_state_dict_round_trip_and_batching() -> None:
    model = small_model(1)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 256, (1, 13), generator=g), torch.randint(0, 256, (1, 29), generator=g)
    _, sa = model(a)
    _, sb = model(b)
    restored = ModelState.from_dict({k: v.clone() for k, v in sa.to_dict().items()})
    assert_states_equal(restored, sa, rtol=0, atol=0)

    # streams at different positions (same phase of the memory chunk) step as one batch
    nxt = torch.randint(0, 256, (2, 6), generator=g)
    batched, state = model(nxt, ModelState.stack([sa, sb]))
    la, sa2 = model(nxt[:1], sa)
    lb, sb2 = model(nxt[1:], sb)
    torch.testing.assert_close(batched, torch.cat([la, lb]), rtol=1e-12, atol=1e-12)
    for got, want in zip(state.unstack(), [sa2, sb2], strict=True):
        assert_states_equal(got, want, rtol=1e-12, atol=1e-12)


def test_state_size_does_not_grow_with_the_stream() -> None:
    model = small_model(2)
    g = torch.Generator().manual_seed(2)
    sizes = {}
    state = None
    for length in (8, 64, 512):  # all multiples of the memory chunk
        tokens = torch.randint(0, 256, (1, length), generator=g)
        _, state = model(tokens, state)
        sizes[length] = state.nbytes()
    assert len(set(sizes.values())) == 1, sizes
    # and the attention part is the same at every position
    _, state = model(torch.randint(0, 256, (1, 3), generator=g), state)
    attention = {k: v.shape for k, v in state.to_dict().items() if ".attention." in k}
    fresh = {k: v.shape for k, v in model.init_state(1).to_dict().items() if ".attention." in k}
    assert attention == fresh


@pytest.mark.parametrize("overrides", [*MEMORIES, {"use_memory": False}])
def test_state_nbytes_counts_every_tensor_of_the_state(overrides: dict) -> None:
    model = small_model(1, **overrides)
    g = torch.Generator().manual_seed(1)
    state = model.init_state(2)
    for length in (1, 3, 4, 9, 2):  # partial chunks of several sizes
        _, state = model(torch.randint(0, 260, (2, length), generator=g), state)
        for one in (state, *state.unstack()):
            want = sum(t.numel() * t.element_size() for t in one.to_dict().values())
            assert one.nbytes() == want


def test_memory_can_be_switched_off_per_call() -> None:
    model = small_model(3)
    tokens = torch.randint(0, 256, (1, 20))
    _, state = model(tokens[:, :12])
    with_memory, _ = model(tokens[:, 12:], state)
    without, after = model(tokens[:, 12:], state, use_memory=False)
    assert not torch.allclose(with_memory, without)
    for before, now in zip(state.blocks, after.blocks, strict=True):
        assert now.memory is before.memory  # untouched
    assert not torch.equal(after.blocks[0].attention.keys, state.blocks[0].attention.keys)
    assert after.position.item() == 20


def test_sliding_window_only_model_has_no_memory() -> None:
    model = small_model(4, use_memory=False)
    assert not any("memory" in name for name, _ in model.named_parameters())
    tokens = torch.randint(0, 256, (2, 30))
    logits, state = model(tokens)
    assert all(b.memory is None for b in state.blocks)
    assert not any(".memory." in k for k in state.to_dict())
    restored = ModelState.from_dict(state.to_dict())
    assert all(b.memory is None for b in restored.blocks)
    streamed, _ = stream(model, tokens, [5, 17])
    torch.testing.assert_close(streamed, logits, **TOL)
    # a token outside window + convolutions + layers cannot reach the last logit
    changed = tokens.clone()
    changed[:, 0] = (changed[:, 0] + 1) % 256
    torch.testing.assert_close(model(changed)[0][:, -1], logits[:, -1], rtol=0, atol=0)


def test_memory_carries_information_beyond_the_window() -> None:
    """With the memory on, an early token reaches a logit far past the attention's reach."""
    model = small_model(5)
    tokens = torch.randint(0, 256, (1, 60))
    changed = tokens.clone()
    changed[:, 0] = (changed[:, 0] + 1) % 256
    assert not torch.allclose(model(changed)[0][:, -1], model(tokens)[0][:, -1])


def test_every_parameter_gets_a_gradient() -> None:
    model = small_model(6, dtype=torch.float32)
    tokens = torch.randint(0, 256, (2, 24))
    logits, _ = model(tokens)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, missing


def test_default_config_is_the_reference_model() -> None:
    model = MAGModel(ModelConfig())
    cfg = model.config
    assert (cfg.d_model, cfg.n_layers, cfg.window, cfg.n_persistent) == (128, 2, 128, 4)
    assert cfg.memory.dim == 128 and cfg.memory.update_rule == "delta" and cfg.memory.lookahead
    assert 300_000 < model.num_params() < 1_000_000
