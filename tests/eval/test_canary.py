"""The recall canary: it counts exact answers right, keeps its session, survives failures."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Callable, Sequence

import pytest

from memsvc.engine import SamplingParams, StreamingEngine
from memsvc.eval.canary import CanaryResult, RecallCanary, canary_facts, run_canary
from memsvc.model import ModelState
from memsvc.model.tokenizer import BOS_ID, EOS_ID, QUERY_ID, decode, encode
from memsvc.obs.metrics import ServiceMetrics
from tests.engine.conftest import tiny_model

FACT = re.compile(r"The magic number for (\w+) is (\d+)\. ")
QUESTION = re.compile(r"What is the magic number for (\w+)\? The magic number for \1 is $")

Spoiler = Callable[[int, list[int]], list[int]]


class Oracle:
    """Sessions with a perfect memory: each answers from the text appended to it; `spoil`
    (question number, right answer) -> what is sent instead."""

    def __init__(self, spoil: Spoiler = lambda _i, answer: answer) -> None:
        self.spoil = spoil
        self.text: dict[str, str] = {}
        self.questions = 0

    def create(self) -> str:
        session_id = f"s{len(self.text)}"
        self.text[session_id] = ""
        return session_id

    def append(self, session_id: str, tokens: Sequence[int]) -> None:
        self.text[session_id] += decode(tokens)

    def query(self, session_id: str, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        assert prompt[0] == QUERY_ID
        question = QUESTION.fullmatch(decode(prompt[1:]))
        assert question is not None, decode(prompt)
        told = dict(FACT.findall(self.text[session_id]))
        answer = encode(told[question.group(1)])
        assert max_new_tokens == len(answer)
        self.questions += 1
        return self.spoil(self.questions - 1, answer)

    def canary(self, **kwargs) -> RecallCanary:
        return RecallCanary(self.create, self.append, self.query, **kwargs)


def test_a_perfect_memory_recalls_every_fact():
    oracle = Oracle()
    result = oracle.canary(facts=8, gap_tokens=100).measure()
    assert (result.correct, result.total, result.recall) == (8, 8, 1.0)
    assert oracle.questions == 8
    assert len(FACT.findall(oracle.text[result.session_id])) == 8


def test_half_the_answers_wrong_is_half_recall():
    def every_other(i: int, answer: list[int]) -> list[int]:
        return answer if i % 2 else [*answer[:-1], ord("0") + (answer[-1] - ord("0") + 1) % 10]

    result = Oracle(every_other).canary(facts=8).measure()
    assert (result.correct, result.recall) == (4, 0.5)


@pytest.mark.parametrize(
    "spoil",
    [
        lambda _i, a: a[:-1],  # stopped early (EOS)
        lambda _i, a: [*a, EOS_ID],  # one token too many
        lambda _i, a: [a[0] + 1, *a[1:]],  # first digit off
        lambda _i, _a: [],  # nothing
    ],
)
def test_only_exact_answers_count(spoil: Spoiler):
    assert Oracle(spoil).canary(facts=4).measure().correct == 0


def test_rounds_reuse_the_session_with_new_facts():
    oracle = Oracle()
    canary = oracle.canary(facts=4, gap_tokens=50)
    first, second = canary.measure(), canary.measure()
    assert (first.round, second.round) == (0, 1)
    assert first.session_id == second.session_id and len(oracle.text) == 1
    facts = FACT.findall(oracle.text[first.session_id])
    assert len(facts) == 8
    assert set(facts[:4]).isdisjoint(facts[4:])
    assert second.recall == 1.0


def test_the_first_round_starts_the_stream_with_bos():
    appended: list[list[int]] = []
    oracle = Oracle()

    def append(session_id: str, tokens: Sequence[int]) -> None:
        appended.append(list(tokens))
        oracle.append(session_id, tokens)

    canary = RecallCanary(oracle.create, append, oracle.query, facts=2, gap_tokens=300)
    canary.measure()
    canary.measure()
    assert appended[0][0] == BOS_ID
    assert BOS_ID not in appended[1]
    # Filler before every fact and after the last: at least gap_tokens bytes each.
    text = decode(appended[1])
    pieces = FACT.split(text)  # filler, word, value, filler, word, value, filler
    assert len(pieces) == 7
    assert all(len(filler) >= 300 for filler in pieces[::3])


def test_a_failed_round_starts_over_in_a_new_session():
    oracle = Oracle()
    calls = 0

    def flaky_query(session_id: str, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ConnectionError("the server went away")
        return oracle.query(session_id, prompt, max_new_tokens)

    canary = RecallCanary(oracle.create, oracle.append, flaky_query, facts=3)
    with pytest.raises(ConnectionError):
        canary.measure()
    result = canary.measure()
    assert result.session_id == "s1" and len(oracle.text) == 2
    assert (result.round, result.recall) == (0, 1.0)  # the failed round is not counted


def test_a_failed_round_deletes_its_session():
    oracle = Oracle()
    deleted: list[str] = []

    def failing_append(session_id: str, tokens: Sequence[int]) -> None:
        raise ConnectionError("the server went away")

    def delete(session_id: str) -> None:
        deleted.append(session_id)
        raise ConnectionError("still away")  # logged, not raised: the canary goes on

    canary = RecallCanary(oracle.create, failing_append, oracle.query, delete=delete, facts=2)
    with pytest.raises(ConnectionError, match="went away"):
        canary.measure()
    assert deleted == ["s0"] and canary.session_id is None
    canary.discard()  # nothing left to delete
    assert deleted == ["s0"]


def test_facts_are_about_distinct_words():
    facts = canary_facts(40, random.Random(0))  # the training vocabulary has 40 objects
    words = [QUESTION.fullmatch(f.question).group(1) for f in facts]
    assert len(set(words)) == 40
    told = [FACT.fullmatch(f.statement).groups() for f in facts]
    assert told == [(word, f.answer) for word, f in zip(words, facts, strict=True)]
    with pytest.raises(ValueError, match="distinct words"):
        canary_facts(41, random.Random(0))


def test_the_canary_runs_through_a_real_model():
    """The tiny random model recalls whatever it recalls; the canary must count its
    answers exactly as they came, and leave the session at the appended position."""
    engine = StreamingEngine(tiny_model(seed=0), max_segment=64)
    states: dict[str, ModelState] = {}
    appended: list[int] = []
    answers: list[tuple[str, str]] = []  # (question, output)

    def create() -> str:
        states["canary"] = engine.init_state()
        return "canary"

    def append(session_id: str, tokens: Sequence[int]) -> None:
        appended.extend(tokens)
        states[session_id], _ = engine.append(states[session_id], tokens)

    def query(session_id: str, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, seed=0)
        output = list(engine.generate(states[session_id], prompt, params))
        answers.append((decode(prompt), decode(output)))
        return output

    canary = RecallCanary(create, append, query, facts=4, gap_tokens=64)
    results = [canary.measure(), canary.measure()]

    told = dict(FACT.findall(decode(appended)))
    right = [told[QUESTION.fullmatch(q).group(1)] == out for q, out in answers]
    assert [r.total for r in results] == [4, 4]
    assert [r.correct for r in results] == [sum(right[:4]), sum(right[4:])]
    assert int(states["canary"].position[0]) == len(appended)


def test_the_schedule_reports_rounds_and_failures():
    metrics = ServiceMetrics()
    oracle = Oracle(lambda i, a: a if i % 4 else a[:-1])  # one of four wrong
    failing = iter([True, False, False])

    def query(session_id: str, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        if next(failing, False):
            raise TimeoutError("deadline exceeded")
        return oracle.query(session_id, prompt, max_new_tokens)

    canary = RecallCanary(oracle.create, oracle.append, query, facts=4, gap_tokens=10)
    seen: list[CanaryResult] = []

    async def main() -> None:
        task = asyncio.create_task(run_canary(canary, 0.01, metrics, seen.append))
        while len(seen) < 2:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(main(), timeout=30))
    sample = metrics.registry.get_sample_value
    assert sample("memsvc_canary_failures_total") == 1
    assert sample("memsvc_canary_recall") == 0.75
    assert sample("memsvc_canary_last_success_timestamp_seconds") > 0
    assert [r.round for r in seen[:2]] == [0, 1]


def test_rounds_take_turns_over_synthetic_and_real_text_haystacks():
    from memsvc.eval.canary import CANARY_HAYSTACKS

    assert CANARY_HAYSTACKS[0] == "sentences"
    assert {h for h in CANARY_HAYSTACKS if h.startswith("real:")} >= {
        "real:english", "real:chinese", "real:code", "real:json", "real:logs"
    }  # fmt: skip
    oracle = Oracle()
    canary = oracle.canary(facts=2, gap_tokens=200, haystacks=("sentences", "real:code"))
    results, rounds = [], []
    for _ in range(3):
        before = len("".join(oracle.text.values()))
        results.append(canary.measure())
        rounds.append("".join(oracle.text.values())[before:])
    assert [r.haystack for r in results] == ["sentences", "real:code", "sentences"]
    assert all(r.recall == 1.0 for r in results)  # the facts stand out of either filler
    # Synthetic units end with a space, real text comes in lines.
    assert "\n" not in rounds[0] and "\n" not in rounds[2] and "\n" in rounds[1]
    with pytest.raises(ValueError, match="haystacks"):
        oracle.canary(haystacks=())


def test_rounds_per_session_starts_a_new_session_when_the_next_round_begins():
    deleted: list[str] = []
    oracle = Oracle()
    canary = RecallCanary(
        oracle.create, oracle.append, oracle.query, delete=deleted.append,
        facts=1, gap_tokens=50, rounds_per_session=2,
    )  # fmt: skip
    sessions = [canary.measure().session_id for _ in range(5)]
    assert sessions == ["s0", "s0", "s1", "s1", "s2"]
    assert deleted == ["s0", "s1"]  # each deleted as the next round began, not after
    assert canary.session_id == "s2"
    with pytest.raises(ValueError, match="rounds_per_session"):
        oracle.canary(rounds_per_session=-1)
