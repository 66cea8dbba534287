"""The recall canary: a synthetic session that is told known facts and asked them back.

Each round appends `facts` new sentences in the phrasing the model was trained
on ("The magic number for lantern is 4821937. ", `memsvc.train.tasks.needle_parts`;
the words recur across rounds with new numbers, so the memory must overwrite),
each after `gap_tokens` of held-out filler and with filler after the last one,
so the answers lie beyond the attention window and must come from the
memory. Then every fact is asked ("QUERY What is the magic number for
lantern? The magic number for lantern is ") and answered greedily with exactly
as many tokens as the answer has; recall@k is the fraction answered byte for
byte.

By default the canary keeps one session across rounds: a first round measures a
fresh memory, later ones a memory that has been written for hours, which is where
saturation shows (the session's guard takes the recall, `SessionGuard.observe_recall`).
`rounds_per_session` N starts a new session every N rounds (the old one is deleted
when the next round begins): the server's canary asks one fact in a fresh session
each round, since no shipped model yet holds many keyed facts (docs/GUARDS.md).
A round that raises deletes its session (best effort) and forgets it, so the
next round starts a new one and no half-written session is left behind.

The canary talks to the service through callables, so the same code runs in
process (the session manager) and against a server (the SDK).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from memsvc.model.tokenizer import QUERY_ID, encode
from memsvc.obs.metrics import ServiceMetrics
from memsvc.train.haystack import VOCABULARIES, haystack_units
from memsvc.train.tasks import needle_parts

log = structlog.get_logger(__name__)

CreateSession = Callable[[], str]
AppendTokens = Callable[[str, Sequence[int]], None]
# (session id, prompt tokens, max new tokens) -> the tokens generated greedily,
# from a copy of the memory (the session is unchanged).
QueryTokens = Callable[[str, Sequence[int], int], Sequence[int]]
DeleteSession = Callable[[str], None]

_MAX_DRAWS = 1000  # draws of fact words before giving up on finding distinct ones


@dataclass(frozen=True)
class Fact:
    statement: str  # appended to the session
    question: str  # asked after QUERY
    answer: str  # the exact continuation


@dataclass(frozen=True)
class CanaryResult:
    round: int  # 0 for the first round of the process
    session_id: str
    correct: int
    total: int
    seconds: float
    haystack: str = "sentences"

    @property
    def recall(self) -> float:
        return self.correct / self.total


def canary_facts(count: int, rng: random.Random) -> list[Fact]:
    """`count` magic-number facts about distinct words of the training vocabulary (two
    values for one word would make one of them unanswerable)."""
    facts: dict[str, Fact] = {}
    for _ in range(_MAX_DRAWS):
        if len(facts) == count:
            return list(facts.values())
        statement, question, answer, _digits = needle_parts("number", rng, "train")
        facts.setdefault(question, Fact(statement, question, answer))
    raise ValueError(f"cannot draw {count} facts about distinct words")


# The filler of successive rounds: synthetic sentences and every real kind (held-out
# sources; the committed sample when no corpus is built), so the canary sees the text
# agents stream and not only the generator the model was first trained on.
CANARY_HAYSTACKS = (
    "sentences", "real:english", "real:code", "real:chinese", "real:json", "real:logs",
    "real:german", "real:japanese",
)  # fmt: skip


class RecallCanary:
    """Writes known facts into a session and measures recall@k; one `measure` is a round."""

    def __init__(
        self,
        create: CreateSession,
        append: AppendTokens,
        query: QueryTokens,
        *,
        delete: DeleteSession | None = None,
        facts: int = 8,
        gap_tokens: int = 512,
        seed: int = 0,
        haystacks: Sequence[str] = CANARY_HAYSTACKS,
        rounds_per_session: int = 0,
    ) -> None:
        if facts < 1:
            raise ValueError(f"facts must be >= 1, got {facts}")
        if gap_tokens < 0:
            raise ValueError(f"gap_tokens must be >= 0, got {gap_tokens}")
        self._create, self._append, self._query = create, append, query
        self._delete = delete
        self.facts = facts
        self.gap_tokens = gap_tokens
        self.seed = seed
        if rounds_per_session < 0:
            raise ValueError(f"rounds_per_session must be >= 0, got {rounds_per_session}")
        self.rounds_per_session = rounds_per_session  # 0: one session for every round
        self._session_rounds = 0
        self.haystacks = tuple(haystacks)
        if not self.haystacks:
            raise ValueError("haystacks must name at least one haystack kind")
        self.session_id: str | None = None
        self.rounds = 0

    def measure(self) -> CanaryResult:
        """One round: append new facts with filler, ask each, count exact answers."""
        began = time.perf_counter()
        rng = random.Random(f"canary-{self.seed}-{self.rounds}")
        if self.rounds_per_session and self._session_rounds >= self.rounds_per_session:
            self.discard()  # the session had its rounds: the next one starts fresh
        facts = canary_facts(self.facts, rng)
        try:
            fresh = self.session_id is None
            if fresh:
                self.session_id = self._create()
            session_id = self.session_id
            self._append(session_id, self._context(facts, rng, bos=fresh))
            correct = sum(self._recalls(session_id, fact) for fact in facts)
        except BaseException:
            self.discard()  # its state is unknown now: start over next round
            raise
        result = CanaryResult(
            self.rounds,
            session_id,
            correct,
            len(facts),
            time.perf_counter() - began,
            self.haystack,
        )
        self.rounds += 1
        self._session_rounds += 1
        return result

    def discard(self) -> None:
        """Deletes the canary's session (if it has one and a `delete`) and forgets it; a failed
        delete is logged, never raised: the canary must go on."""
        session_id, self.session_id = self.session_id, None
        self._session_rounds = 0
        if session_id is None or self._delete is None:
            return
        try:
            self._delete(session_id)
        except Exception as error:
            log.warning("canary_session_not_deleted", session=session_id, error=repr(error))

    def _context(self, facts: Sequence[Fact], rng: random.Random, bos: bool) -> list[int]:
        """filler fact filler fact ... filler; BOS first in a fresh session, as in training.
        The filler's held-out vocabulary shares no word with the facts."""
        parts = [self._filler(rng) + fact.statement for fact in facts]
        return encode("".join(parts) + self._filler(rng), bos=bos)

    @property
    def haystack(self) -> str:
        """This round's filler: the kinds take turns, synthetic and real text alike."""
        return self.haystacks[self.rounds % len(self.haystacks)]

    def _filler(self, rng: random.Random) -> str:
        kind = self.haystack
        return "".join(haystack_units(rng, kind, VOCABULARIES["heldout"], self.gap_tokens))

    def _recalls(self, session_id: str, fact: Fact) -> bool:
        answer = encode(fact.answer)
        output = self._query(session_id, [QUERY_ID, *encode(fact.question)], len(answer))
        return list(output) == answer


async def run_canary(
    canary: RecallCanary,
    interval_s: float,
    metrics: ServiceMetrics,
    on_result: Callable[[CanaryResult], None] | None = None,
) -> None:
    """Measure a round every `interval_s` seconds until cancelled, off the event loop.

    Each round sets `memsvc_canary_recall` and logs it; a round that raises is
    counted in `memsvc_canary_failures_total` and logged, and the loop goes on:
    a monitor that dies with its first error would report nothing when it matters.
    `on_result` gets every finished round (the manager feeds the canary session's
    guard with it)."""
    while True:
        try:
            result = await asyncio.to_thread(canary.measure)
        except Exception:
            metrics.count_canary_failure()
            log.exception("canary_failed", round=canary.rounds)
        else:
            metrics.set_canary_recall(result.recall)
            log.info(
                "canary_recall",
                round=result.round,
                session=result.session_id,
                recall=result.recall,
                correct=result.correct,
                total=result.total,
                haystack=result.haystack,
                seconds=round(result.seconds, 3),
            )
            if on_result is not None:
                on_result(result)
        await asyncio.sleep(interval_s)
