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
from memsvc.memory import NonFiniteStateError
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
        if not self.stops:  # nothing is ever held back: the general path's answer, quicker
            self.remaining -= 1
            return Verdict([token], "length" if self.remaining == 0 else None, True, None)
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
    by `step_batch`), or empty; `add` joins another session at any step (its
    decoder rows are built for the batch's step and concatenated). Iterating yields
    (session index, token) as tokens are released; when a session finishes,
    `states[i]` and `finish_reasons[i]` are set, exactly as `Generation` would leave
    them. `cancel(i)` ends session i at once ("cancelled"): its state keeps the
    prompt and the tokens released so far, never a held-back one. `park(i)` takes a
    session out of the steps without ending it (a client that reads slowly) and
    `resume(i)` puts it back; `fed[i]` lists the tokens fed for session i so far.

    A step whose memory update goes non-finite is one session's fault, but it stops
    the whole decoder: given `replay` (state, tokens) -> (state, next logits), every
    running session is recomputed from where it joined with the tokens fed since;
    a session whose replay fails too ends with reason "error" and `errors[i]` set,
    the others go on in a fresh decoder. Without `replay` the error propagates.
    """

    def __init__(
        self,
        build: Callable[[Sequence[ModelState], int], Decoder],
        decoder: Decoder | None = None,
        logits: Tensor | None = None,
        params: Sequence[SamplingParams] = (),
        starts: Sequence[ModelState] = (),
        replay: Callable[[ModelState, list[int]], tuple[ModelState, Tensor]] | None = None,
    ) -> None:
        self._build = build  # (states, start step) -> decoder rows for them
        self._replay = replay
        self.decoder = decoder
        self.params: list[SamplingParams] = []
        self.rules: list[StopRule] = []
        self.generators: list[torch.Generator] = []
        self.states: list[ModelState | None] = []
        self.finish_reasons: list[str | None] = []
        self.fed: list[list[int]] = []
        self.starts: list[ModelState | None] = []  # where each session joined (replay)
        self.errors: list[Exception | None] = []
        self._logits = logits  # (running, V)
        self._running: list[int] = []  # session index of each decoder row
        self._parked: dict[int, tuple[ModelState, Tensor]] = {}  # state and next logits
        for i, p in enumerate(params):
            assert logits is not None
            self._register(p, logits.device, starts[i] if starts else None)
        self._running = list(range(len(params)))

    @property
    def running(self) -> list[int]:
        """Sessions being stepped."""
        return list(self._running)

    def add(self, state: ModelState, logits: Tensor, params: SamplingParams) -> int:
        """Join a session whose prompt is in `state` (`logits` (V,) after it); returns its
        index. From the next step on it advances with the others."""
        session = self._register(params, logits.device, state)
        self._join(session, state, logits)
        return session

    def park(self, session: int) -> None:
        """Stop stepping `session` for now (its state and next logits are kept)."""
        if session not in self._running or self.decoder is None or self._logits is None:
            return
        row = self._running.index(session)
        self._parked[session] = (self.decoder.state(row), self._logits[row])
        self._select([r for r in range(len(self._running)) if r != row])

    def resume(self, session: int) -> None:
        """Step a parked session again."""
        if session in self._parked:
            self._join(session, *self._parked.pop(session))

    def step(self) -> list[tuple[int, int]]:
        """One token for every running session; returns the released (session, token)s."""
        if not self._running:
            return []
        assert self.decoder is not None and self._logits is not None
        rows = self._running
        sampled = sample_rows(
            self._logits, [self.params[i] for i in rows], [self.generators[i] for i in rows]
        )
        tokens = sampled.tolist()
        released: list[tuple[int, int]] = []
        verdicts = []
        decoder = self.decoder
        for row, (session, token) in enumerate(zip(rows, tokens, strict=True)):
            verdict = self.rules[session].accept(token, lambda row=row: decoder.state(row))
            released.extend((session, t) for t in verdict.released)
            verdicts.append(verdict)
        for row, verdict in enumerate(verdicts):  # EOS or a stop: ends before its token
            if verdict.finish_reason is not None and not verdict.feed:
                self._finish(row, verdict.finish_reason, verdict.state)
        fed = [row for row, verdict in enumerate(verdicts) if verdict.feed]
        self._select(fed)
        if fed:
            ending = {}  # max_new_tokens: these end after their last token
            for row in fed:
                self.fed[rows[row]].append(tokens[row])
                if verdicts[row].finish_reason is not None:
                    ending[rows[row]] = verdicts[row].finish_reason
            ids = sampled if len(fed) == len(tokens) else sampled[fed]
            try:
                self._logits = self.decoder.step(ids)
            except NonFiniteStateError:
                if self._replay is None:
                    raise
                self._recover()
            ended = [i for i, session in enumerate(self._running) if session in ending]
            for i in ended:
                self._finish(i, ending[self._running[i]], None)
            self._select([i for i in range(len(self._running)) if i not in ended])
        return released

    def cancel(self, session: int) -> None:
        """Stop session `session` now (its held-back tokens are dropped, not committed)."""
        if session in self._parked:
            state, _ = self._parked.pop(session)
            held = self.rules[session].cancel()
            self.states[session] = held if held is not None else state
            self.finish_reasons[session] = "cancelled"
            return
        if session not in self._running:
            return
        row = self._running.index(session)
        self._finish(row, "cancelled", self.rules[session].cancel())
        self._select([r for r in range(len(self._running)) if r != row])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        while self._running:
            yield from self.step()

    # ---- internals ---------------------------------------------------------------------

    def _register(
        self, params: SamplingParams, device: torch.device, start: ModelState | None
    ) -> int:
        self.starts.append(start)
        self.errors.append(None)
        self.params.append(params)
        self.rules.append(StopRule(params))
        self.generators.append(make_generator(params, device))
        self.states.append(None)
        self.finish_reasons.append(None)
        self.fed.append([])
        return len(self.params) - 1

    def _join(self, session: int, state: ModelState, logits: Tensor) -> None:
        if not self._running or self.decoder is None or self._logits is None:
            self.decoder = self._build([state], 0)
            self._logits = logits[None]
        else:
            self.decoder.extend(self._build([state], self.decoder.steps))
            self._logits = torch.cat([self._logits, logits[None]])
        self._running.append(session)

    def _recover(self) -> None:
        """After a failed decoder step: replay every running session from where it
        joined; those that fail again end with "error", the rest get a fresh decoder."""
        assert self._replay is not None
        kept: list[tuple[int, ModelState, Tensor]] = []
        for session in self._running:
            start = self.starts[session]
            assert start is not None, "replay needs the state each session joined with"
            try:
                state, logits = self._replay(start, self.fed[session])
            except NonFiniteStateError as error:
                self.errors[session] = error
                self.states[session] = None
                self.finish_reasons[session] = "error"
                continue
            kept.append((session, state, logits))
        self._running = [session for session, _, _ in kept]
        if kept:
            self.decoder = self._build([state for _, state, _ in kept], 0)
            self._logits = torch.stack([logits for _, _, logits in kept])

    def _finish(self, row: int, reason: str | None, state: ModelState | None) -> None:
        assert self.decoder is not None
        session = self._running[row]
        self.states[session] = state if state is not None else self.decoder.state(row)
        self.finish_reasons[session] = reason

    def _select(self, rows: list[int]) -> None:
        """Keep decoder rows `rows` (indices into the running sessions), in order."""
        if rows == list(range(len(self._running))):
            return
        self._running = [self._running[r] for r in rows]
        if rows:
            assert self.decoder is not None and self._logits is not None
            self.decoder.keep(rows)
            self._logits = self._logits[rows]
