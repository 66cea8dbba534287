"""GenerateRun hands each step's tokens to its stream as one batch, in lockstep with the
writes, and commits exactly what was written (server/generations.py)."""

from __future__ import annotations

import asyncio

from memsvc.engine import NoTokenYet
from memsvc.server.generations import HANDOVER, GenerateRun


class _Sampled:
    """What a SessionGeneration gives a run: `ready` tokens per pool step, then the end."""

    def __init__(self, total: int, per_step: int) -> None:
        self.total, self.per_step = total, per_step
        self.sampled = 0
        self.available = 0
        self.kept: int | None = None
        self.finish_reason: str | None = None

    def step(self) -> None:
        self.available = min(self.total, self.available + self.per_step)

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
            elif run.ready():
                sampled.step()
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


def test_each_handover_is_one_message_of_at_most_handover_tokens() -> None:
    messages, sampled = asyncio.run(_run(total=100, per_step=40))
    assert [t for m in messages for t in m] == list(range(1, 101))
    assert all(1 <= len(m) <= HANDOVER for m in messages)
    assert len(messages) < 100  # batched: not a message per token
    assert sampled.finish_reason == "length"


def test_one_token_per_step_gives_one_token_per_message() -> None:
    messages, _ = asyncio.run(_run(total=10, per_step=1))
    assert messages == [[t] for t in range(1, 11)]


def test_a_run_stopped_early_keeps_exactly_the_written_tokens() -> None:
    messages, sampled = asyncio.run(_run(total=1000, per_step=40, stop_after=3))
    assert sampled.kept == sum(len(m) for m in messages) == 3 * HANDOVER
