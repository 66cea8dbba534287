"""The DecodePool against generating alone on the reference path: generations that
join at random steps, read at random paces (parked and resumed), stop, run out or
are closed, each give the tokens, finish reason and state they give alone; a
non-finite update ends only the generation at fault."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from memsvc.engine import DecodePool, NoTokenYet, SamplingParams, StreamingEngine
from memsvc.engine.decode import StopRule
from memsvc.memory import NonFiniteStateError
from memsvc.model import ModelState
from memsvc.model.tokenizer import EOS_ID, N_BYTES
from tests.state_asserts import assert_states_equal

from .conftest import CHUNK, random_tokens

TOL = {"rtol": 1e-9, "atol": 1e-9}


def history(engine: StreamingEngine, n: int, seed: int) -> ModelState:
    return (
        engine.append(engine.init_state(), random_tokens(n, seed))[0] if n else engine.init_state()
    )


def alone(engine: StreamingEngine, state, prompt, params):
    generation = engine.generate(state, prompt, params)
    return list(generation), generation.finish_reason, generation.state


def drain(generation, taken: list[int], most: int) -> bool:
    """Take up to `most` tokens; True once the generation has ended."""
    for _ in range(most):
        try:
            taken.append(next(generation))
        except NoTokenYet:
            return False
        except StopIteration:
            return True
    return False


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pool_equals_generating_alone(engines, seed: int) -> None:
    fast, reference = engines
    rng = random.Random(seed)
    n = 6
    states = [history(fast, rng.randrange(0, 30), seed=10 * seed + i) for i in range(n)]
    prompts = [random_tokens(rng.randrange(1, 12), seed=100 + 10 * seed + i) for i in range(n)]
    params = [
        SamplingParams(temperature=0, max_new_tokens=rng.randrange(5, 30)),
        SamplingParams(temperature=1.0, top_k=20, top_p=0.9, max_new_tokens=25, seed=seed),
        SamplingParams(temperature=2.0, max_new_tokens=40, seed=11 + seed),  # EOS likely
        SamplingParams(temperature=0.7, max_new_tokens=30, seed=3, stop=(b"ab", b"\x10")),
        SamplingParams(temperature=0, max_new_tokens=12),
        SamplingParams(temperature=1.3, max_new_tokens=35, seed=7 + seed),
    ]
    joins = sorted(rng.randrange(0, 25) for _ in range(n))
    pool = DecodePool(fast, ahead=4)  # small, so that slow readers are parked and resumed
    open_: dict[int, object] = {}
    taken: dict[int, list[int]] = {i: [] for i in range(n)}
    ended: set[int] = set()
    for step in range(400):
        for i in range(n):
            if joins[i] == step:
                open_[i] = pool.join(states[i], prompts[i], params[i])
        pool.step()
        for i, generation in open_.items():
            # Session 4 reads slowly (it gets parked), the others at random paces.
            pace = 1 if i == 4 and step % 7 else rng.randrange(0, 3)
            if i not in ended and drain(generation, taken[i], pace if i != 4 else pace % 2):
                ended.add(i)
        if len(ended) == n:
            break
    assert len(ended) == n and len(pool) == 0
    for i in range(n):
        want, reason, state = alone(reference, states[i], prompts[i], params[i])
        generation = open_[i]
        assert taken[i] == want and generation.finish_reason == reason, i
        assert_states_equal(generation.state, state, **TOL)


def test_a_slow_reader_is_parked_and_the_others_go_on(engines) -> None:
    fast, _ = engines
    pool = DecodePool(fast, ahead=4)
    params = SamplingParams(temperature=0, max_new_tokens=40)
    slow = pool.join(history(fast, 5, 1), [65], params)
    quick = pool.join(history(fast, 9, 2), [66], params)
    got: list[int] = []
    for _ in range(10):
        pool.step()
        drain(quick, got, 5)
    assert slow.waiting == pool.ahead and pool.stepping == 1 and len(got) == 10
    drain(slow, [], 1)  # 3 left: still parked (it resumes once half are taken)
    pool.step()
    assert pool.stepping == 1
    drain(slow, [], 1)
    pool.step()
    assert pool.stepping == 2


def test_close_leaves_the_pool_and_the_others_unchanged(engines) -> None:
    fast, reference = engines
    pool = fast.decode_pool()
    params = SamplingParams(temperature=0, max_new_tokens=20)
    states = [history(fast, 7, 3), history(fast, 12, 4)]
    first, second = pool.join(states[0], [70], params), pool.join(states[1], [71], params)
    got: list[int] = []
    for _ in range(6):
        pool.step()
        drain(first, [], 1)
        drain(second, got, 1)
    first.close()
    assert first.finish_reason == "cancelled" and first.state is None and len(pool) == 1
    with pytest.raises(StopIteration):
        next(first)
    while not drain(second, got, 1):
        pool.step()
    want, reason, state = alone(reference, states[1], [71], params)
    assert got == want and second.finish_reason == reason
    assert_states_equal(second.state, state, **TOL)


def test_a_non_finite_update_ends_only_its_own_generation(engines) -> None:
    fast, reference = engines
    pool = fast.decode_pool()
    params = SamplingParams(temperature=0, max_new_tokens=3 * CHUNK)
    good_state = history(fast, 13, 5)
    bad_state = history(fast, 3, 6)
    blocks = list(bad_state.blocks)
    memory = blocks[1].memory
    poisoned = tuple(torch.full_like(w, float("nan")) for w in memory.weights)
    blocks[1] = replace(blocks[1], memory=replace(memory, weights=poisoned))
    bad_state = replace(bad_state, blocks=tuple(blocks))
    good, bad = pool.join(good_state, [72], params), pool.join(bad_state, [73], params)
    got: list[int] = []
    failed = None
    for _ in range(4 * CHUNK):
        pool.step()
        drain(good, got, 1)
        try:
            drain(bad, [], 1)
        except NonFiniteStateError as error:
            failed = error
    assert failed is not None and bad.finish_reason is None
    want, reason, state = alone(reference, good_state, [72], params)
    assert got == want and good.finish_reason == reason
    assert_states_equal(good.state, state, **TOL)


def test_join_checks_its_arguments(engines) -> None:
    fast, _ = engines
    pool = fast.decode_pool()
    params = SamplingParams(max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt token"):
        pool.join(fast.init_state(), [], params)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        pool.join(fast.init_state(), [10_000], params)
    assert len(pool) == 0
    with pytest.raises(ValueError, match="ahead"):
        type(pool)(fast, ahead=0)


def test_stop_rule_without_stops_answers_as_the_general_path() -> None:
    # A rule with a stop sequence that can never match runs the general path (held-back
    # prefixes, matching); without stops the rule answers at once: the same verdicts.
    generator = torch.Generator().manual_seed(4)
    for limit in (1, 5, 40):
        tokens = torch.randint(0, EOS_ID + 2, (limit,), generator=generator).tolist()  # EOS too
        fast = StopRule(SamplingParams(max_new_tokens=limit))
        general = StopRule(SamplingParams(max_new_tokens=limit))
        general.stops = [[N_BYTES + 7, N_BYTES + 8]]  # ids no sampled token takes
        for token in tokens:
            got = fast.accept(token, lambda: None)
            want = general.accept(token, lambda: None)
            assert got == want
            if got.finish_reason is not None:
                break
