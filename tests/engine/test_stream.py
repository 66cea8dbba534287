"""StreamingEngine: append in any split == one append, step_batch == one by one,
generation (determinism, greedy, stop sequences, limits), fixed state size."""

from __future__ import annotations

import pytest
import torch

import kernels.decode_step as decode_step
from memsvc.engine import SamplingParams, StreamingEngine
from memsvc.model.tokenizer import EOS_ID, N_BYTES
from tests.state_asserts import assert_states_equal

from .conftest import CHUNK, random_tokens, tiny_model

TOL = {"rtol": 1e-9, "atol": 1e-9}


@pytest.fixture(scope="module")
def engine() -> StreamingEngine:
    return StreamingEngine(tiny_model(0), max_segment=2 * CHUNK)


def append_in_pieces(engine: StreamingEngine, tokens: list[int], cuts: list[int]):
    state, stats = engine.init_state(), None
    for a, b in zip([0, *cuts], [*cuts, len(tokens)], strict=True):
        state, stats = engine.append(state, tokens[a:b])
    return state, stats


def test_append_in_any_split_equals_one_append(engine: StreamingEngine) -> None:
    tokens = random_tokens(37, seed=1)
    # one forward, not cut at max_segment: the reference for every split
    logits, whole = engine.model(torch.tensor([tokens]), engine.init_state())
    for cuts in ([], [1], [5, 8, 9, 16, 17, 30], list(range(1, 37))):
        state, stats = append_in_pieces(engine, tokens, cuts)
        torch.testing.assert_close(stats.last_logits, logits[0, -1], **TOL)
        assert_states_equal(state, whole, **TOL)
        assert stats.position == 37
    assert stats.appended == 1  # the last piece of the one-token split


def test_append_stats_count_the_memory_writes(engine: StreamingEngine) -> None:
    state, stats = engine.append(engine.init_state(), random_tokens(3 * CHUNK + 5, seed=2))
    layers = engine.model.config.n_layers
    assert (stats.position, stats.appended) == (3 * CHUNK + 5, 3 * CHUNK + 5)
    assert stats.writes_applied + stats.writes_skipped == 3 * layers  # three complete chunks
    assert stats.writes_applied == 3 * layers  # tau = 0: every chunk is written
    fresh = engine.append(engine.init_state(), [7])[1]
    assert fresh.writes_applied == 0
    assert stats.memory_norm != pytest.approx(fresh.memory_norm)  # the writes moved the weights
    assert stats.surprise_ema > 0 == fresh.surprise_ema
    empty_state, empty = engine.append(state, [])
    assert empty.last_logits is None and empty.position == stats.position
    assert_states_equal(empty_state, state, rtol=0, atol=0)


def test_step_batch_equals_appending_one_by_one(engine: StreamingEngine) -> None:
    # sessions at different positions and chunk offsets, with ragged token counts
    # (none, one, inside a chunk, across chunks, past max_segment; 2 tokens at offsets 6 and 1)
    histories = [0, 3, 3, 8, 13, 21, 30, 5, 9]
    counts = [7, 1, 1, 40, 0, 19, 2, 3 * CHUNK + 3, 2]
    states = [
        engine.append(engine.init_state(), random_tokens(n, seed=10 + i))[0] if n else None
        for i, n in enumerate(histories)
    ]
    states = [s if s is not None else engine.init_state() for s in states]
    new = [random_tokens(n, seed=50 + i) for i, n in enumerate(counts)]
    batched = engine.step_batch(states, new)
    assert len(batched) == len(states)
    for state, tokens, (got_state, got) in zip(states, new, batched, strict=True):
        want_state, want = engine.append(state, tokens)
        assert_states_equal(got_state, want_state, **TOL)
        if want.last_logits is None:
            assert got.last_logits is None
        else:
            torch.testing.assert_close(got.last_logits, want.last_logits, **TOL)
        assert (got.position, got.appended) == (want.position, want.appended)
        assert (got.writes_applied, got.writes_skipped) == (
            want.writes_applied,
            want.writes_skipped,
        )


def test_step_batch_shares_forwards_between_sessions() -> None:
    engine = StreamingEngine(tiny_model(0), max_segment=2 * CHUNK, decode_cpp=False)
    calls = []
    hook = engine.model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    try:
        states = [engine.init_state() for _ in range(4)]
        engine.step_batch(states, [random_tokens(5 * CHUNK, seed=i) for i in range(4)])
    finally:
        hook.remove()
    # four sessions at the same offset: one forward of batch 4 per max_segment piece
    assert calls == [(4, 2 * CHUNK), (4, 2 * CHUNK), (4, CHUNK)]


def test_on_the_cpp_chunk_path_sessions_step_one_by_one(engine: StreamingEngine) -> None:
    decode_step.load()
    after_3 = engine.append(engine.init_state(), random_tokens(3, seed=9))[0]
    states = [engine.init_state(), engine.init_state(), after_3, after_3]
    new = [random_tokens(n, seed=10 + i) for i, n in enumerate((2 * CHUNK, 2 * CHUNK, 1, 1))]
    calls = []
    hook = engine.model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    forward = engine._forward
    engine._forward = lambda tokens, state: calls.append(tokens.shape) or forward(tokens, state)
    try:
        batched = engine.step_batch(states, new)
    finally:
        del engine._forward
        hook.remove()
    # Sessions 0 and 1 (and 2 and 3) share a round, but no batched eager forward runs
    # (the model's hook would see a batch): each session's piece is one C++ call.
    assert sorted(tuple(shape) for shape in calls) == [
        (1, 1),
        (1, 1),
        (1, 2 * CHUNK),
        (1, 2 * CHUNK),
    ]
    reference = StreamingEngine(engine.model, max_segment=2 * CHUNK, fast_decode=False)
    for state, tokens, (got_state, got) in zip(states, new, batched, strict=True):
        want_state, want = reference.append(state, tokens)
        assert_states_equal(got_state, want_state, **TOL)
        torch.testing.assert_close(got.last_logits, want.last_logits, **TOL)


def test_a_session_alone_in_its_batch_takes_all_it_has_in_one_forward() -> None:
    # offsets 5 and 0 never share a batch; each takes its tokens past chunk boundaries
    # in one forward (up to max_segment) instead of one forward per chunk boundary
    engine = StreamingEngine(tiny_model(0), max_segment=8 * CHUNK)
    first = engine.append(engine.init_state(), random_tokens(5, seed=3))[0]
    states = [first, engine.init_state()]
    new = [random_tokens(6 * CHUNK + 2, seed=4), random_tokens(9 * CHUNK + 3, seed=5)]
    calls = []
    forward = engine._forward  # the engine's forwards, on either path (the C++ chunk
    engine._forward = lambda tokens, state: calls.append(tokens.shape) or forward(tokens, state)
    try:  # path takes the last 11 tokens, the model the rest)
        batched = engine.step_batch(states, new)
    finally:
        del engine._forward
    assert calls == [(1, 6 * CHUNK + 2), (1, 8 * CHUNK), (1, CHUNK + 3)]
    for state, tokens, (got_state, got) in zip(states, new, batched, strict=True):
        want_state, want = engine.append(state, tokens)
        assert_states_equal(got_state, want_state, **TOL)
        torch.testing.assert_close(got.last_logits, want.last_logits, **TOL)


def test_step_batch_rejects_mismatched_arguments(engine: StreamingEngine) -> None:
    with pytest.raises(ValueError, match="2 states but 1 token lists"):
        engine.step_batch([engine.init_state(), engine.init_state()], [[1]])
    with pytest.raises(ValueError, match="single-stream states, got one of 2 streams"):
        engine.step_batch([engine.model.init_state(2)], [[1]])
    with pytest.raises(ValueError, match=r"token id 260 is outside the vocabulary \[0, 260\)"):
        engine.append(engine.init_state(), [1, 260])
    with pytest.raises(ValueError, match="tokens must be integers"):
        engine.append(engine.init_state(), [1.5])


def test_as_tokens_is_the_check_every_caller_shares(engine: StreamingEngine) -> None:
    ids = engine.as_tokens([3, 1, 259])
    assert ids.dtype == torch.int64 and ids.device == engine.device and ids.tolist() == [3, 1, 259]
    with pytest.raises(ValueError, match=r"token id -1 is outside the vocabulary"):
        engine.as_tokens([1, -1])
    with pytest.raises(ValueError, match="tokens must be 1-D"):
        engine.as_tokens(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="tokens must be integers"):
        engine.as_tokens([True])


def greedy_chain(engine: StreamingEngine, prompt: list[int], n: int) -> list[int]:
    """The obvious greedy decoder: rerun the whole sequence, argmax over bytes and EOS."""
    seq = list(prompt)
    for _ in range(n):
        logits, _ = engine.model(torch.tensor([seq]))
        allowed = logits[0, -1].clone()
        allowed[N_BYTES:] = float("-inf")
        allowed[EOS_ID] = logits[0, -1, EOS_ID]
        token = int(allowed.argmax())
        if token == EOS_ID:
            break
        seq.append(token)
    return seq[len(prompt) :]


def test_greedy_generation_is_the_argmax_chain(engine: StreamingEngine) -> None:
    prompt = random_tokens(11, seed=3)
    gen = engine.generate(
        engine.init_state(), prompt, SamplingParams(temperature=0, max_new_tokens=20)
    )
    out = list(gen)
    assert out == greedy_chain(engine, prompt, 20)
    assert len(out) == 20 and gen.finish_reason == "length"
    # the final state has seen the prompt and exactly the yielded tokens
    _, want = engine.model(torch.tensor([prompt + out]))
    assert_states_equal(gen.state, want, **TOL)


def test_generation_is_deterministic_for_a_seed(engine: StreamingEngine) -> None:
    prompt = random_tokens(9, seed=4)
    params = SamplingParams(temperature=1.0, max_new_tokens=12, allow_eos=False, seed=123)
    runs = [list(engine.generate(engine.init_state(), prompt, params)) for _ in range(2)]
    other = list(engine.generate(engine.init_state(), prompt, SamplingParams(
        temperature=1.0, max_new_tokens=12, allow_eos=False, seed=124)))  # fmt: skip
    assert runs[0] == runs[1]
    assert len(runs[0]) == 12
    assert other != runs[0]


def test_a_stop_sequence_stops_generation_and_is_not_emitted(engine: StreamingEngine) -> None:
    prompt = random_tokens(9, seed=5)
    greedy = SamplingParams(temperature=0, max_new_tokens=20)
    free = list(engine.generate(engine.init_state(), prompt, greedy))
    assert len(free) == 20
    stop = bytes(free[8:11])
    first = bytes(free).index(stop)
    near_miss = bytes(free[2:4]) + b"\x00"  # its start is generated: held back, then released
    assert near_miss not in bytes(free)
    params = SamplingParams(temperature=0, max_new_tokens=20, stop=(near_miss, stop))
    gen = engine.generate(engine.init_state(), prompt, params)
    out = list(gen)
    assert out == free[:first]
    assert gen.finish_reason == "stop"
    _, want = engine.model(torch.tensor([prompt + out]))  # the stop sequence is not in the state
    assert_states_equal(gen.state, want, **TOL)


def test_eos_ends_generation() -> None:
    model = tiny_model(1)
    with torch.no_grad():  # EOS's output row aligned with the final norm's gains: it wins soon
        model.lm_head.weight[EOS_ID] = 50 * model.norm.weight.sign()
    eos_engine = StreamingEngine(model)
    prompt = random_tokens(5, seed=6)
    gen = eos_engine.generate(eos_engine.init_state(), prompt, SamplingParams(temperature=0))
    out = list(gen)
    assert gen.finish_reason == "eos"
    assert out == greedy_chain(eos_engine, prompt, 256)
    _, want = model(torch.tensor([prompt + out]))  # EOS is neither yielded nor in the state
    assert_states_equal(gen.state, want, **TOL)


def test_state_size_stays_constant_as_the_stream_grows(engine: StreamingEngine) -> None:
    state = engine.init_state()
    aligned, every = {state.nbytes()}, set()
    for i in range(16):  # positions 5, 10, .., 80: every offset in the chunk
        state, stats = engine.append(state, random_tokens(5, seed=100 + i))
        every.add(state.nbytes())
        if stats.position % CHUNK == 0:
            aligned.add(state.nbytes())
    state, _ = engine.append(state, random_tokens(400, seed=99))  # to position 480
    aligned.add(state.nbytes())
    assert len(aligned) == 1  # at chunk boundaries: always the bytes of a fresh state
    # in between only the pending partial chunk (< CHUNK tokens) adds to it
    assert len(every) == CHUNK and max(every) < 2 * min(every)


def test_a_long_append_of_one_stream_runs_on_the_cpp_chunk_path_window_by_window() -> None:
    decode_step.load()
    engine = StreamingEngine(tiny_model(0), max_segment=8 * CHUNK)
    window = engine.model.config.window
    start = engine.append(engine.init_state(), random_tokens(5, seed=6))[0]
    chunk = engine._chunk_path()
    assert chunk is not None
    calls: list[int] = []
    forward = chunk.forward
    chunk.forward = lambda tokens, state, memory=True: (
        calls.append(tokens.shape[1]) or forward(tokens, state, memory)
    )
    model_calls = []
    hook = engine.model.register_forward_hook(lambda m, args, out: model_calls.append(1))
    tokens = random_tokens(8 * CHUNK + 3 * window + 7, seed=7)
    try:
        got_state, got = engine.append(start, tokens)
        stepped = engine.step_batch([start, start], [tokens, tokens[:-3]])
    finally:
        del chunk.forward
        hook.remove()
    # No eager forward: W-token calls (the max_segment piece, then the rest).
    assert not model_calls
    one = [window] * (8 * CHUNK // window) + [window] * 3 + [7]
    assert calls[: len(one)] == one and sum(calls) == 3 * len(tokens) - 3
    reference = StreamingEngine(engine.model, max_segment=8 * CHUNK, fast_decode=False)
    for (state, stats), n in [((got_state, got), 0), *zip(stepped, [0, 3], strict=True)]:
        want_state, want = reference.append(start, tokens[: len(tokens) - n])
        assert_states_equal(state, want_state, **TOL)
        torch.testing.assert_close(stats.last_logits, want.last_logits, **TOL)
