"""Generations token by token: the stop rule, and `DecodeBatch` (several sessions'
generations advanced together, one batched `Decoder` step per token).

`StopRule` is the one place that decides what a sampled token does: ends the
generation (EOS, a stop sequence, max_new_tokens), is released to the client, or
is held back because it may begin a stop sequence. `Generation` (stream.py) and
`DecodeBatch` both drive it, so a session generates the same tokens and ends in
the same state whichever of them runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from memsvc.engine.sampling import SamplingParams, sample_rows
from memsvc.model import ModelState
from memsvc.model.decode import Decoder
from memsvc.model.tokenizer import EOS_ID


@dataclass
class Verdict:
    """What one sampled token did."""

    released: list[int]  # tokens the client may have now, in order
    finish_reason: str | None  # None: the generation goes on
    feed: bool  # the token goes into the model (it was not EOS or part of a stop)
    state: ModelState | None  # where the session ends, when not after the fed tokens


class StopRule:
    """EOS, stop sequences (held back until they cannot match) and max_new_tokens."""

    def __init__(self, params: SamplingParams) -> None:
        self.stops = [list(seq) for seq in params.stop]
        self.remaining = params.max_new_tokens
        self.held: list[tuple[int, ModelState | None]] = []  # (token, state before it)

    def accept(self, token: int, state_before: Callable[[], ModelState]) -> Verdict:
        """Judge one sampled token. state_before() is the session's state before the
        token; it is only asked for when a stop sequence may need to undo the token."""
        if token == EOS_ID:
            return Verdict(self._flush(), "eos", False, None)
        self.held.append((token, None))
        ids = [t for t, _ in self.held]
        matched = max((len(s) for s in self.stops if ids[-len(s) :] == s), default=0)
        keep = 0 if matched else _open_stop_prefix(ids, self.stops)
        if matched or keep:
            self.held[-1] = (token, state_before())
        if matched:
            state = self.held[-matched][1]  # forget the stop sequence's tokens
            del self.held[-matched:]
            return Verdict(self._flush(), "stop", False, state)
        released = [t for t, _ in self.held[: len(self.held) - keep]]
        del self.held[: len(self.held) - keep]
        self.remaining -= 1
        if self.remaining == 0:
            return Verdict(released + self._flush(), "length", True, None)
        return Verdict(released, None, True, None)

    def cancel(self) -> ModelState | None:
        """The state to keep when the generation is cancelled now: before the first
        held-back token (the client never got it), or None: after every fed token."""
        return self.held[0][1] if self.held else None

    def _flush(self) -> list[int]:
        out = [t for t, _ in self.held]
        self.held.clear()
        return out


def _open_stop_prefix(ids: list[int], stops: list[list[int]]) -> int:
    """Length of the longest suffix of ids that a stop sequence begins with (not all of it)."""
    return max(
        (n for s in stops for n in range(1, min(len(s) - 1, len(ids)) + 1) if ids[-n:] == s[:n]),
        default=0,
    )


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator:
    """The sampling generator of one generation: seeded by params.seed, else fresh."""
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


class DecodeBatch:
    """Generations of several sessions advanced together: every `step` samples one
    token per running session and feeds them all through one `Decoder` step.

    Built by `StreamingEngine.decode_batch` after the prompts were appended (batched
    by `step_batch`). Iterating yields (session index, token) as tokens are released;
    when a session finishes, `states[i]` and `finish_reasons[i]` are set, exactly as
    `Generation` would leave them. `cancel(i)` ends session i at once ("cancelled"):
    its state keeps the prompt and the tokens released so far, never a held-back one.
    """

    def __init__(
        self,
        decoder: Decoder,
        logits: Tensor,
        params: Sequence[SamplingParams],
    ) -> None:
        n = len(params)
        self.decoder = decoder
        self.params = list(params)
        self.rules = [StopRule(p) for p in params]
        device = logits.device
        self.generators = [make_generator(p, device) for p in params]
        self.states: list[ModelState | None] = [None] * n
        self.finish_reasons: list[str | None] = [None] * n
        self._logits = logits  # (running, V)
        self._running = list(range(n))  # session index of each decoder row

    @property
    def running(self) -> list[int]:
        """Sessions still generating."""
        return list(self._running)

    def step(self) -> list[tuple[int, int]]:
        """One token for every running session; returns the released (session, token)s."""
        if not self._running:
            return []
        rows = self._running
        sampled = sample_rows(
            self._logits, [self.params[i] for i in rows], [self.generators[i] for i in rows]
        )
        tokens = sampled.tolist()
        released: list[tuple[int, int]] = []
        verdicts = []
        for row, (session, token) in enumerate(zip(rows, tokens, strict=True)):
            verdict = self.rules[session].accept(token, lambda row=row: self.decoder.state(row))
            released.extend((session, t) for t in verdict.released)
            verdicts.append(verdict)
        for row, verdict in enumerate(verdicts):  # EOS or a stop: ends before its token
            if verdict.finish_reason is not None and not verdict.feed:
                self._finish(row, verdict.finish_reason, verdict.state)
        fed = [row for row, verdict in enumerate(verdicts) if verdict.feed]
        self._select(fed)
        if fed:
            ids = sampled if len(fed) == len(tokens) else sampled[fed]
            self._logits = self.decoder.step(ids)
            ended = [i for i, row in enumerate(fed) if verdicts[row].finish_reason is not None]
            for i in ended:  # max_new_tokens: ends after its last token
                self._finish(i, verdicts[fed[i]].finish_reason, None)
            self._select([i for i in range(len(fed)) if i not in ended])
        return released

    def cancel(self, session: int) -> None:
        """Stop session `session` now (its held-back tokens are dropped, not committed)."""
        if session not in self._running:
            return
        row = self._running.index(session)
        self._finish(row, "cancelled", self.rules[session].cancel())
        self._select([r for r in range(len(self._running)) if r != row])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        while self._running:
            yield from self.step()

    # ---- internals ---------------------------------------------------------------------

    def _finish(self, row: int, reason: str | None, state: ModelState | None) -> None:
        session = self._running[row]
        self.states[session] = state if state is not None else self.decoder.state(row)
        self.finish_reasons[session] = reason

    def _select(self, rows: list[int]) -> None:
        """Keep decoder rows `rows` (indices into the running sessions), in order."""
        if rows == list(range(len(self._running))):
            return
        self._running = [self._running[r] for r in rows]
        if rows:
            self.decoder.keep(rows)
            self._logits = self._logits[rows]
