"""Keyed facts: N facts about distinct keys spread through a long stream, each asked by its key.

    BOS haystack ... "Maria's PIN is 48213." ... "Update: Maria's PIN is now 7710."
        ... "The serial for project Comet is K7Q2X9." ... haystack
    QUERY "What is Maria's PIN? It is " answer "7710" (QUERY question answer)* EOS

A fact's value is digits (5-10), a made-up lowercase word, a code of letters and
digits (up to 12) or a UUID. A revised fact is restated later with a new value,
and the answer is the latest one. Statements go at haystack unit boundaries
(sentences, or lines of real text), spread uniformly; with `out_of_window` every
statement ends more than `window` tokens before the first question, so only the
memory can answer. The phrasing (phrasing.py) comes from the training or the
held-out generator, with the haystack vocabulary of the same name.

`fact_sample` builds training samples (questions asked one after another in
the same sequence); `make_fact_probe` builds an evaluation probe whose
questions are each asked on a copy of the streamed state.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from memsvc.model.tokenizer import BOS_ID, EOS_ID, QUERY_ID
from memsvc.train.haystack import VOCABULARIES, Haystack, haystack_units
from memsvc.train.phrasing import PHRASINGS, ValueKind
from memsvc.train.tasks import Sample, fit_bytes, snap, unit_starts


@dataclass(frozen=True)
class Fact:
    key: str
    attr: str
    kind: ValueKind
    statement: str  # the sentence that states the first value
    revision: str | None  # the sentence that restates it with the latest value
    answer: str  # the latest value
    question: str  # the question and the lead the answer follows

    @property
    def inserts(self) -> tuple[str, ...]:
        return (self.statement,) if self.revision is None else (self.statement, self.revision)


def make_facts(
    rng: random.Random,
    vocabulary: str,
    n: int,
    value_kinds: tuple[ValueKind, ...],
    revised: int = 0,
) -> list[Fact]:
    """`n` facts about distinct keys; the first `revised` of them are restated later."""
    phrasing = PHRASINGS[vocabulary]
    facts: list[Fact] = []
    seen: set[str] = set()
    while len(facts) < n:
        key = phrasing.key(rng)
        if key in seen:
            continue
        seen.add(key)
        kind = rng.choice(value_kinds)
        attr = rng.choice(phrasing.attributes[kind])
        value = phrasing.value(kind, rng)
        statement = phrasing.statement(rng, key, attr, value) + " "
        revision = None
        if len(facts) < revised:
            while (latest := phrasing.value(kind, rng)) == value:
                pass
            revision = phrasing.revision(rng, key, attr, latest) + " "
            value = latest
        question = phrasing.question(rng, key, attr)
        facts.append(Fact(key, attr, kind, statement, revision, value, question))
    return facts


@dataclass(frozen=True)
class Layout:
    context: bytes  # the haystack with every statement in it (no BOS)
    at: tuple[int, ...]  # per fact: where its latest statement starts in `context`


def lay_out(
    rng: random.Random,
    facts: list[Fact],
    hay_bytes: int,
    haystack: Haystack,
    vocabulary: str,
    distractor_rate: float,
    keep_clear: int,
) -> Layout:
    """Insert every fact's statements into `hay_bytes` of haystack at unit boundaries,
    uniformly spread, all of them before the last `keep_clear` haystack bytes."""
    units = haystack_units(
        rng, haystack, VOCABULARIES[vocabulary], hay_bytes, distractor_rate, digits=7
    )
    hay = fit_bytes(units, hay_bytes)
    starts = unit_starts(units)
    hi = hay_bytes - keep_clear
    if hi < 0:
        raise ValueError(f"{hay_bytes} haystack bytes cannot keep {keep_clear} clear")
    inserts: list[tuple[int, int, int, str]] = []  # (offset, fact, order, text)
    for index, fact in enumerate(facts):
        offsets = sorted(snap(hay, rng.randint(0, hi), 0, hi, starts) for _ in fact.inserts)
        for order, (offset, text) in enumerate(zip(offsets, fact.inserts, strict=True)):
            inserts.append((offset, index, order, text))
    inserts.sort(key=lambda item: (item[0], item[2], item[1]))
    parts: list[bytes] = []
    at = [0] * len(facts)
    previous, size = 0, 0
    for offset, index, _, text in inserts:
        parts.append(hay[previous:offset])
        size += offset - previous
        at[index] = size  # the latest statement comes last for its fact
        data = text.encode()
        parts.append(data)
        size += len(data)
        previous = offset
    parts.append(hay[previous:])
    return Layout(b"".join(parts), tuple(at))


def _question_tokens(fact: Fact) -> list[int]:
    return [QUERY_ID, *fact.question.encode()]


# ---- training samples ------------------------------------------------------------------------

MAX_REDRAWS = 50  # sentence draws for a lone fact before a length counts as too short


def fact_sample(
    rng: random.Random,
    length: int,
    *,
    max_facts: int,
    value_kinds: tuple[ValueKind, ...],
    haystack: Haystack,
    vocabulary: str,
    distractor_rate: float,
    window: int,
    out_of_window: bool,
    revise_share: float = 0.25,
    max_questions: int = 8,
    phrasing: str | None = None,
) -> Sample:
    """A training sample of exactly `length` tokens: 1..max_facts facts, some revised,
    then questions about up to `max_questions` of them (in random order). The facts are
    phrased by `phrasing` (a PHRASINGS name; None: the haystack vocabulary's)."""
    keep_clear = window + 1 if out_of_window else 0
    n = rng.randint(1, max_facts)
    squeezed = False  # no revisions: the last resort of a short sample
    redraws = 0  # then other sentences for the one fact (a composed one can run long)
    while True:  # fewer facts until they and their questions fit in `length`
        revised = 0 if squeezed else sum(rng.random() < revise_share for _ in range(n))
        facts = make_facts(rng, phrasing or vocabulary, n, value_kinds, revised)
        asked = rng.sample(range(n), min(n, max_questions))
        block = sum(
            1 + len(facts[i].question.encode()) + len(facts[i].answer.encode()) for i in asked
        )
        inserted = sum(len(t.encode()) for f in facts for t in f.inserts)
        hay_bytes = length - 2 - block - inserted  # - BOS, EOS
        if hay_bytes >= keep_clear + 16:
            break
        if n > 1:
            n -= 1
        elif not squeezed:
            squeezed = True
        elif redraws < MAX_REDRAWS:
            redraws += 1
        else:
            raise ValueError(f"length {length} is too short for a fact and its question")
    layout = lay_out(rng, facts, hay_bytes, haystack, vocabulary, distractor_rate, keep_clear)
    tokens = [BOS_ID, *layout.context]
    questions, answers, texts = [], [], []
    for i in asked:
        q_start = len(tokens)
        tokens += _question_tokens(facts[i])
        a_start = len(tokens)
        tokens += facts[i].answer.encode()
        questions.append((q_start, a_start))
        answers.append((a_start, len(tokens)))
        texts.append(facts[i].answer)
    tokens.append(EOS_ID)
    return Sample(
        tokens=torch.tensor(tokens, dtype=torch.int64),
        answers=tuple(answers),
        questions=tuple(questions),
        answer_texts=tuple(texts),
        needle=None,
        **_links(facts, layout.at, questions, asked),
    )


def _links(
    facts: list[Fact], at: tuple[int, ...], questions: list[tuple[int, int]], asked: list[int]
) -> dict[str, tuple]:
    """Sample.fact_writes / fact_reads: every byte of every fact's latest value is written
    under the query of the position before it, and read before the same byte of its answer
    (byte j of fact i: write row first[i] + j). A fact stated value first has neither: the
    query before its value cannot know the key (lookahead keys)."""
    writes: list[int] = []
    first: list[int | None] = []
    for fact, start in zip(facts, at, strict=True):
        if value_first(fact):  # no write key can carry its key: nothing to align
            first.append(None)
            continue
        first.append(len(writes))
        value = _value_start(fact, start)
        writes += [value - 1 + j for j in range(len(fact.answer.encode()))]
    reads = [
        (a_start - 1 + j, row + j)
        for (_, a_start), i in zip(questions, asked, strict=True)
        if (row := first[i]) is not None
        for j in range(len(facts[i].answer.encode()))
    ]
    return {"fact_writes": tuple(writes), "fact_reads": tuple(reads)}


def value_first(fact: Fact) -> bool:
    """Whether `fact`'s latest statement gives the value before it names the key."""
    text = fact.inserts[-1].lower()
    key_at = text.find(fact.key.lower())
    return key_at < 0 or text.index(fact.answer.lower()) < key_at


def _value_start(fact: Fact, at: int) -> int:
    """The token index (BOS first) of the first byte of `fact`'s latest value, whose latest
    statement starts at byte `at` of the context (its first occurrence there: a made-up word
    value that is also part of the key would point a little early, a rare noisy link)."""
    text = fact.inserts[-1].encode()
    return 1 + at + text.index(fact.answer.encode())


# ---- evaluation probes -----------------------------------------------------------------------


@dataclass(frozen=True)
class FactQuestion:
    question: Tensor  # (Q,) int64: QUERY + question + lead
    answer: str
    kind: ValueKind
    depth: float  # where the fact's latest statement starts, as a share of the context
    revised: bool
    stated: str  # the fact's latest statement, as streamed
    asked: str  # the question and its lead, as asked (after QUERY)


@dataclass(frozen=True)
class FactProbe:
    """Stream `context`, then ask each question on a copy of the state."""

    seed: int
    context: Tensor  # (L,) int64, BOS first
    questions: tuple[FactQuestion, ...]


def make_fact_probe(
    seed: int,
    length: int,
    n_facts: int,
    value_kinds: tuple[ValueKind, ...],
    *,
    window: int,
    haystack: Haystack = "sentences",
    vocabulary: str = "heldout",
    distractor_rate: float = 0.2,
    revised: int = 0,
    phrasing: str | None = None,
) -> FactProbe:
    """A probe whose context (question excluded) is `length` tokens, with `n_facts` facts
    (the first `revised` of them restated later), every statement beyond the window of
    every question. The same seed gives the same probe on every machine. `phrasing` (a
    PHRASINGS name; None: the vocabulary's) states and asks the facts."""
    rng = random.Random(f"facts-{length}-{n_facts}-{','.join(value_kinds)}-{revised}-{seed}")
    facts = make_facts(rng, phrasing or vocabulary, n_facts, value_kinds, revised)
    inserted = sum(len(t.encode()) for f in facts for t in f.inserts)
    hay_bytes = length - 1 - inserted
    keep_clear = window + 1  # every statement ends beyond the window of every question
    if hay_bytes < keep_clear + 64:
        raise ValueError(f"length {length} is too short for {n_facts} facts beyond the window")
    layout = lay_out(rng, facts, hay_bytes, haystack, vocabulary, distractor_rate, keep_clear)
    total = 1 + len(layout.context)
    questions = tuple(
        FactQuestion(
            question=torch.tensor(_question_tokens(fact), dtype=torch.int64),
            answer=fact.answer,
            kind=fact.kind,
            depth=round((1 + at) / total, 4),
            revised=fact.revision is not None,
            stated=fact.inserts[-1].strip(),
            asked=fact.question,
        )
        for fact, at in zip(facts, layout.at, strict=True)
    )
    context = torch.tensor([BOS_ID, *layout.context], dtype=torch.int64)
    return FactProbe(seed=seed, context=context, questions=questions)
