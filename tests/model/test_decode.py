"""The Decoder (one token at a time, preallocated buffers) against the model's forward:
same logits and same state, for any split of a stream, for both memory kinds (the
delta matrix memory and the deep momentum MLP), a closed write gate, the ops guards'
mitigation knobs and the memory-off ablation; batched streams equal single ones."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kernels import decode_step
from memsvc.model import MAGModel
from memsvc.model.decode import Decoder
from memsvc.train.recipe import memory_config
from tests.state_asserts import assert_states_equal

from .conftest import small_config, small_model

TOL = {"rtol": 1e-9, "atol": 1e-9}


@pytest.fixture(autouse=True, params=["eager", "cpp"])
def step_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs twice: the eager step, and the C++ step (kernels/decode_step)."""
    if request.param == "cpp":
        decode_step.load()
    else:
        monkeypatch.setenv("MEMSVC_DECODE_CPP", "0")
    return request.param


def test_the_cpp_step_runs_the_delta_memory_and_no_memory(step_path: str) -> None:
    cpp = step_path == "cpp"
    state = small_model(0).init_state(1)
    assert (Decoder(small_model(0), [state]).layers[0].fast is not None) == cpp
    assert (Decoder(small_model(0), [state], use_memory=False).layers[1].fast is not None) == cpp
    assert Decoder(small_model(0), [state], fast=False).layers[0].fast is None
    # Chunk ends without the chunk path: the delta rule through an open gate, on C++.
    assert Decoder(small_model(0), [state]).layers[0].mem_step.fast_writes == cpp
    gated = gated_model()
    assert not Decoder(gated, [gated.init_state(1)]).layers[0].mem_step.fast_writes
    deep = deep_model()  # the MLP memory: its read in C++ too
    assert (Decoder(deep, [deep.init_state(1)]).layers[0].fast is not None) == cpp


LENGTH = 41  # past the window (8) and several memory chunks (4)


def deep_model() -> MAGModel:
    return small_model(1, memory=memory_config("deep2", 32, chunk_size=4))


def gated_model() -> MAGModel:
    memory = replace(small_config().memory, tau=0.05, adaptive_forgetting=True)
    return small_model(2, memory=memory)


def relative_gated_model() -> MAGModel:
    memory = replace(small_config().memory, tau=1.0, gate="relative")
    return small_model(4, memory=memory)


MODELS = {
    "delta": lambda: small_model(0),
    "deep2": deep_model,
    "gated": gated_model,
    "relative-gate": relative_gated_model,
    "no-attn-conv": lambda: small_model(3, attn_conv_size=0),
}


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("split", [0, 1, 3, 9, 22])
def test_decoder_equals_forward_after_any_split(kind: str, split: int) -> None:
    model = MODELS[kind]()
    ids = tokens(LENGTH, seed=split)
    want_logits, want_state = model(ids, None)
    _, state = model(ids[:, :split], None) if split else (None, model.init_state(1))
    decoder = Decoder(model, [state])
    for t in range(split, LENGTH):
        logits = decoder.step(ids[0, t : t + 1])
        torch.testing.assert_close(logits[0], want_logits[0, t], **TOL)
    assert not logits.requires_grad  # nothing in a step records autograd history
    assert_states_equal(decoder.state(0), want_state, **TOL)


def test_decoder_state_continues_on_the_chunk_path() -> None:
    model = deep_model()
    ids = tokens(LENGTH, seed=7)
    want_logits, want_state = model(ids, None)
    _, state = model(ids[:, :5], None)
    decoder = Decoder(model, [state])
    for t in range(5, 18):
        decoder.step(ids[0, t : t + 1])
    logits, state = model(ids[:, 18:], decoder.state(0))
    torch.testing.assert_close(logits, want_logits[:, 18:], **TOL)
    assert_states_equal(state, want_state, **TOL)


def test_mitigated_state_decodes_like_forward() -> None:
    model = small_model(0)
    ids = tokens(30, seed=3)
    _, state = model(ids[:, :6], None)
    state = state.with_mitigation(step_scale=0.5, forget_boost=0.2)
    want_logits, want_state = model(ids[:, 6:], state)
    decoder = Decoder(model, [state])
    for t in range(6, 30):
        logits = decoder.step(ids[0, t : t + 1])
        torch.testing.assert_close(logits[0], want_logits[0, t - 6], **TOL)
    assert_states_equal(decoder.state(0), want_state, **TOL)


def test_memory_off_decodes_like_forward_and_keeps_the_memory() -> None:
    model = small_model(0)
    ids = tokens(20, seed=4)
    _, state = model(ids[:, :7], None)
    want_logits, want_state = model(ids[:, 7:], state, use_memory=False)
    decoder = Decoder(model, [state], use_memory=False)
    for t in range(7, 20):
        logits = decoder.step(ids[0, t : t + 1])
        torch.testing.assert_close(logits[0], want_logits[0, t - 7], **TOL)
    assert_states_equal(decoder.state(0), want_state, **TOL)


@pytest.mark.parametrize("kind", ["delta", "deep2"])
def test_batched_streams_equal_single_streams(kind: str) -> None:
    """Streams at different positions and chunk offsets in one decoder, one dropped
    half way: each gives what it gives alone (batch invariance)."""
    model = MODELS[kind]()
    histories = [0, 1, 6, 11, 30]
    streams = [tokens(h + 14, seed=20 + i) for i, h in enumerate(histories)]
    states = [
        model(s[:, :h], None)[1] if h else model.init_state(1)
        for s, h in zip(streams, histories, strict=True)
    ]
    wants = [model(s, None) for s in streams]
    decoder = Decoder(model, states)
    alive = list(range(len(streams)))
    for step in range(14):
        if step == 6:  # drop stream 2, as a finished generation is
            decoder.keep([0, 1, 3, 4])
            alive = [0, 1, 3, 4]
        ids = torch.cat(
            [streams[i][0, histories[i] + step : histories[i] + step + 1] for i in alive]
        )
        logits = decoder.step(ids)
        for row, i in enumerate(alive):
            torch.testing.assert_close(logits[row], wants[i][0][0, histories[i] + step], **TOL)
    for row, i in enumerate(alive):
        assert_states_equal(decoder.state(row), wants[i][1], **TOL)


def test_float32_decoder_tracks_forward() -> None:
    model = small_model(0, dtype=torch.float32)
    ids = tokens(LENGTH, seed=9)
    want_logits, want_state = model(ids, None)
    decoder = Decoder(model, [model.init_state(1)])
    for t in range(LENGTH):
        logits = decoder.step(ids[0, t : t + 1])
        torch.testing.assert_close(logits[0], want_logits[0, t], rtol=1e-4, atol=1e-4)
    assert_states_equal(decoder.state(0), want_state, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_streams_joining_a_running_decoder_equal_single_streams(kind: str) -> None:
    """Streams join a running decoder at random steps (`start` = its step, then `extend`),
    one of them mitigated, one dropped: each gives what it gives alone."""
    model = MODELS[kind]()
    rng = torch.Generator().manual_seed(hash(kind) % 1000)
    n, steps = 5, 23
    histories = [int(x) for x in torch.randint(0, 19, (n,), generator=rng)]
    joins = [0, *sorted(int(x) for x in torch.randint(1, steps - 3, (n - 1,), generator=rng))]
    streams = [tokens(histories[i] + steps, seed=40 + i) for i in range(n)]
    states = []
    for i, s in enumerate(streams):
        state = model(s[:, : histories[i]], None)[1] if histories[i] else model.init_state(1)
        if i == 2:
            state = state.with_mitigation(step_scale=0.5, forget_boost=0.1)
        states.append(state)
    wants = [model(s[:, histories[i] :], states[i]) for i, s in enumerate(streams)]
    decoder, alive, fed = None, [], [0] * n
    for step in range(steps):
        for i in [i for i in range(n) if joins[i] == step]:
            joining = Decoder(model, [states[i]], start=decoder.steps if decoder else 0)
            if decoder is None:
                decoder = joining
            else:
                decoder.extend(joining)
            alive.append(i)
        if step == 15 and 1 in alive:  # a finished generation leaves
            decoder.keep([r for r, i in enumerate(alive) if i != 1])
            alive.remove(1)
        assert decoder is not None
        ids = torch.cat(
            [streams[i][0, histories[i] + fed[i] : histories[i] + fed[i] + 1] for i in alive]
        )
        logits = decoder.step(ids)
        for row, i in enumerate(alive):
            torch.testing.assert_close(logits[row], wants[i][0][0, fed[i]], **TOL)
            fed[i] += 1
    for row, i in enumerate(alive):
        want = model(streams[i][:, histories[i] : histories[i] + fed[i]], states[i])[1]
        assert_states_equal(decoder.state(row), want, **TOL)


def test_a_decoder_joins_only_at_its_own_step() -> None:
    model = small_model(0)
    decoder = Decoder(model, [model.init_state(1)])
    decoder.step(torch.tensor([5]))
    with pytest.raises(ValueError, match="step 0"):
        decoder.extend(Decoder(model, [model.init_state(1)]))
    with pytest.raises(ValueError, match="start"):
        Decoder(model, [model.init_state(1)], start=-1)
