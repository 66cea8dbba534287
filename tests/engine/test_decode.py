"""Generation through the decoder against the reference path (the chunk path one
token at a time): same tokens, finish reasons and states, alone and batched
(`decode_batch`); cancellation keeps only what the client received."""

from __future__ import annotations

import pytest

from memsvc.engine import SamplingParams, StreamingEngine
from tests.state_asserts import assert_states_equal

from .conftest import random_tokens

TOL = {"rtol": 1e-9, "atol": 1e-9}


def history(engine: StreamingEngine, n: int, seed: int):
    return (
        engine.append(engine.init_state(), random_tokens(n, seed))[0] if n else engine.init_state()
    )


def run(engine: StreamingEngine, state, prompt, params):
    generation = engine.generate(state, prompt, params)
    return list(generation), generation.finish_reason, generation.state


PARAMS = [
    SamplingParams(temperature=0, max_new_tokens=30),
    SamplingParams(temperature=1.0, top_k=20, top_p=0.9, max_new_tokens=25, seed=5),
    SamplingParams(temperature=2.0, max_new_tokens=40, seed=11),  # EOS likely
]


@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("past", [0, 5, 21])
def test_fast_generate_equals_reference(engines, params: SamplingParams, past: int) -> None:
    fast, reference = engines
    state = history(fast, past, seed=past)
    prompt = random_tokens(3, seed=100 + past)
    got, got_reason, got_state = run(fast, state, prompt, params)
    want, want_reason, want_state = run(reference, state, prompt, params)
    assert got == want and got_reason == want_reason
    assert_states_equal(got_state, want_state, **TOL)


def test_stop_sequence_rolls_back_the_same_state(engines) -> None:
    fast, reference = engines
    state = history(fast, 9, seed=1)
    free = run(fast, state, [65], SamplingParams(temperature=0, max_new_tokens=30))[0]
    stop = bytes(free[12:15])  # a stop sequence the greedy output is known to reach
    near_miss = bytes([free[12], (free[13] + 1) % 256])  # held back, then released
    params = SamplingParams(temperature=0, max_new_tokens=30, stop=(near_miss, stop))
    got, reason, got_state = run(fast, state, [65], params)
    want, want_reason, want_state = run(reference, state, [65], params)
    assert (got, reason) == (want, want_reason) and reason == "stop"
    assert bytes(got).find(stop) == -1 and len(got) <= 12
    assert_states_equal(got_state, want_state, **TOL)
    # the state has seen the prompt and exactly the yielded tokens
    appended = fast.append(state, [65, *got])[0]
    assert_states_equal(got_state, appended, **TOL)


def test_decode_batch_equals_generating_alone(engines) -> None:
    fast, reference = engines
    pasts = [0, 3, 8, 13, 30]
    states = [history(fast, n, seed=40 + i) for i, n in enumerate(pasts)]
    prompts = [random_tokens(1 + i, seed=60 + i) for i in range(len(pasts))]
    params = [SamplingParams(temperature=0, max_new_tokens=10 + 3 * i) for i in range(len(pasts))]
    params[1] = SamplingParams(temperature=1.0, top_p=0.8, max_new_tokens=20, seed=3)
    batch = fast.decode_batch(states, prompts, params)
    released: dict[int, list[int]] = {i: [] for i in range(len(pasts))}
    for session, token in batch:
        released[session].append(token)
    for i, (state, prompt, p) in enumerate(zip(states, prompts, params, strict=True)):
        want, want_reason, want_state = run(reference, state, prompt, p)
        assert released[i] == want and batch.finish_reasons[i] == want_reason
        assert_states_equal(batch.states[i], want_state, **TOL)


def test_cancel_keeps_only_the_released_tokens(engines) -> None:
    fast, _ = engines
    states = [history(fast, 6, seed=1), history(fast, 11, seed=2)]
    params = SamplingParams(temperature=0, max_new_tokens=50)
    batch = fast.decode_batch(states, [[70], [71]], params)
    released: dict[int, list[int]] = {0: [], 1: []}
    for _ in range(7):
        for session, token in batch.step():
            released[session].append(token)
    batch.cancel(0)
    assert batch.finish_reasons[0] == "cancelled" and batch.running == [1]
    want = fast.append(states[0], [70, *released[0]])[0]
    assert_states_equal(batch.states[0], want, **TOL)
    for session, token in batch:  # the other session runs on to its end
        released[session].append(token)
    assert batch.finish_reasons[1] == "length" and len(released[1]) == 50
    assert_states_equal(batch.states[1], fast.append(states[1], [71, *released[1]])[0], **TOL)


def test_decode_batch_checks_its_arguments(engines) -> None:
    fast, _ = engines
    params = SamplingParams(max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt token"):
        fast.decode_batch([fast.init_state()], [[]], params)
    with pytest.raises(ValueError, match="1 states, 2 prompts"):
        fast.decode_batch([fast.init_state()], [[1], [2]], params)
