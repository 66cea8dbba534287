"""GenerateRun hands its tokens to its stream in batches, in lockstep with the writes, and
commits exactly what was written (server/generations.py): the first token at once, then
HANDOVER tokens per message, or what waits once HANDOVER_WAIT_S passed since the last
write, or what is left at the end."""

from __future__ import annotations

import asyncio
import time

import pytest

from memsvc.engine import NoTokenYet
from memsvc.server import generations
from memsvc.server.generations import HANDOVER, GenerateRun


class _Sampled:
    """What a SessionGeneration gives a run: `per_step` more tokens per pool step (the
    pool steps whether or not the run takes them), then the end."""

    def __init__(self, total: int, per_step: int) -> None:
        self.total, self.per_step = total, per_step
        self.sampled = 0
        self.available = 0
        self.kept: int | None = None
        self.finish_reason: str | None = None

    def step(self) -> None:
        self.available = min(self.total, self.available + self.per_step)

    def due(self, tokens: int, late: bool) -> bool:  # as SessionGeneration.due
        waiting = self.available - self.sampled
        return self.available == self.total or waiting >= tokens or (late and waiting > 0)

    def __next__(self) -> int:
        if self.sampled == self.total:
            self.finish_reason = "length"
            raise StopIteration
        if self.sampled == self.available:
            raise NoTokenYet
        self.sampled += 1
        return self.sampled

    def close(self, keep: int | None = None) -> None:
        self.kept = keep


async def _run(total: int, per_step: int, stop_after: int | None = None) -> tuple[list, _Sampled]:
    sampled = _Sampled(total, per_step)
    run = GenerateRun(asyncio.get_running_loop(), lambda: sampled, lambda: None, "t", "s", None)
    run.advance()  # joins
    messages: list[list[int]] = []

    async def model_thread() -> None:  # the scheduler's steps, on this loop for the test
        while not run.finished:
            if run.abandoned:
                run.stop()
            else:
                sampled.step()
                if run.ready():
                    run.advance()
            await asyncio.sleep(0)

    stepping = asyncio.ensure_future(model_thread())
    async for tokens in run.tokens():
        messages.append(tokens)
        run.delivered(len(tokens))
        if stop_after is not None and len(messages) == stop_after:
            run.abandon()
            break
    await stepping
    return messages, sampled


@pytest.fixture
def no_wait_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hand-over waits for HANDOVER tokens however slow the machine (deterministic)."""
    monkeypatch.setattr(generations, "HANDOVER_WAIT_S", 3600.0)


def test_each_handover_is_one_message_of_at_most_handover_tokens() -> None:
    messages, sampled = asyncio.run(_run(total=100, per_step=40))
    assert [t for m in messages for t in m] == list(range(1, 101))
    assert all(1 <= len(m) <= HANDOVER for m in messages)
    assert len(messages) < 100  # batched: not a message per token
    assert sampled.finish_reason == "length"


def test_the_first_token_goes_out_alone_then_full_handovers_then_the_rest(no_wait_rule) -> None:
    messages, _ = asyncio.run(_run(total=40, per_step=1))
    assert messages == [[1], list(range(2, 18)), list(range(18, 34)), list(range(34, 41))]


def test_tokens_that_waited_long_enough_go_out_without_a_full_handover() -> None:
    async def check() -> None:
        sampled = _Sampled(total=100, per_step=3)
        run = GenerateRun(asyncio.get_running_loop(), lambda: sampled, lambda: None, "t", "s", None)
        run.advance()  # joins
        sampled.step()
        assert run.ready()  # the first token: at once
        run.advance()
        [first] = [t async for t in _one(run)]
        run.delivered(len(first))
        sampled.step()  # 2 + 3 wait, fewer than HANDOVER
        assert not run.ready()  # just written: wait for more
        run._written_at = time.monotonic() - generations.HANDOVER_WAIT_S
        assert run.ready()  # waited long enough: what waits goes out
        run.advance()
        [second] = [t async for t in _one(run)]
        assert (first, second) == ([1, 2, 3], [4, 5, 6])

    asyncio.run(check())


async def _one(run: GenerateRun):
    """The next message the run handed over."""
    async for tokens in run.tokens():
        yield tokens
        return


def test_a_run_stopped_early_keeps_exactly_the_written_tokens() -> None:
    messages, sampled = asyncio.run(_run(total=1000, per_step=40, stop_after=3))
    assert sampled.kept == sum(len(m) for m in messages) == 3 * HANDOVER
