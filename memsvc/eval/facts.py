"""Keyed-fact recall through the real streaming engine.

Each probe (memsvc.train.facts.make_fact_probe) is streamed into a fresh
state; then every one of its facts is asked on a copy of that state (the
session itself never sees a question), the answer generated greedily exactly
as long as the expected one and compared byte for byte. Results are kept per
question with everything a report slices by: haystack, length, number of
facts, value kind, the fact's depth, and whether it was revised. A wrong answer
that is another fact's value of the same stream (cut or run on to the expected
answer's length) is marked `other_key`: the memory recalled a value but not the
one for this key (the failure of a model that answers every question with the
same salient value).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

from memsvc.engine import SamplingParams, StreamingEngine
from memsvc.eval.probe import PIECE_TOKENS
from memsvc.model import ModelState
from memsvc.train.facts import FactProbe, FactQuestion, make_fact_probe
from memsvc.train.phrasing import Phrasing, ValueKind

DEPTH_BUCKETS = 5  # depth is reported in fifths of the context


@dataclass(frozen=True)
class FactCell:
    """One configuration: `samples` probes of `n_facts` facts in `length` tokens."""

    haystack: str
    length: int
    n_facts: int
    value_kinds: tuple[ValueKind, ...]
    revised: int = 0  # facts per probe restated with a new value (the latest must win)
    distractor_rate: float = 0.2
    vocabulary: str = "heldout"
    phrasing: str | None = None  # a PHRASINGS name for the keys, statements and questions
    # (None: the vocabulary's); the filler stays the vocabulary's


@dataclass(frozen=True)
class FactResult:
    haystack: str
    length: int
    n_facts: int
    seed: int
    kind: str
    depth: float
    revised: bool
    answer: str
    output: str
    correct: bool
    other_key: bool = False  # wrong, and another fact's value of the same stream (module doc)
    stated: str = ""  # the fact's latest statement and the question asked: which phrasings
    asked: str = ""  # are recalled and which never trigger the write or the read


@dataclass(frozen=True)
class StreamStats:
    tokens: int
    seconds: float
    writes_applied: int
    writes_skipped: int

    @property
    def updates_per_1k(self) -> float:
        return 1000 * self.writes_applied / max(1, self.tokens)

    @property
    def write_share(self) -> float:
        return self.writes_applied / max(1, self.writes_applied + self.writes_skipped)


def evaluate_cell(
    engine: StreamingEngine,
    cell: FactCell,
    seeds: Iterable[int],
    window: int,
    on_tokens: Callable[[int], None] | None = None,
) -> tuple[list[FactResult], StreamStats]:
    results: list[FactResult] = []
    tokens = applied = skipped = 0
    seconds = 0.0
    for seed in seeds:
        probe = make_fact_probe(
            seed,
            cell.length,
            cell.n_facts,
            cell.value_kinds,
            window=window,
            haystack=cell.haystack,
            vocabulary=cell.vocabulary,
            phrasing=cell.phrasing,
            distractor_rate=cell.distractor_rate,
            revised=cell.revised,
        )
        began = time.perf_counter()
        state, writes = stream(engine, probe, on_tokens)
        seconds += time.perf_counter() - began
        tokens += len(probe.context)
        applied += writes[0]
        skipped += writes[1]
        for question in probe.questions:
            output = ask(engine, state, question)
            answers = [q.answer for q in probe.questions]
            results.append(
                FactResult(
                    haystack=cell.haystack,
                    length=cell.length,
                    n_facts=cell.n_facts,
                    seed=seed,
                    kind=question.kind,
                    depth=question.depth,
                    revised=question.revised,
                    answer=question.answer,
                    output=output,
                    correct=output == question.answer,
                    other_key=answered_other_key(output, question.answer, answers),
                    stated=question.stated,
                    asked=question.asked,
                )
            )
    return results, StreamStats(tokens, seconds, applied, skipped)


def stream(
    engine: StreamingEngine, probe: FactProbe, on_tokens: Callable[[int], None] | None = None
) -> tuple[ModelState, tuple[int, int]]:
    """The state after the probe's context, and the memory writes (applied, skipped)."""
    state = engine.init_state()
    stats = None
    for start in range(0, len(probe.context), PIECE_TOKENS):
        piece = probe.context[start : start + PIECE_TOKENS]
        state, stats = engine.append(state, piece)
        if on_tokens is not None:
            on_tokens(len(piece))
    assert stats is not None  # a probe has at least one token
    return state, (stats.writes_applied, stats.writes_skipped)


def answered_other_key(output: str, answer: str, answers: Sequence[str]) -> bool:
    """Whether `output` (as long as `answer`) is wrong and is another of the stream's
    `answers`, cut or run on to that length."""
    if output == answer:
        return False
    others = set(answers) - {answer}
    return any(v.startswith(output) or output.startswith(v) for v in others)


def ask(engine: StreamingEngine, state: ModelState, question: FactQuestion) -> str:
    """The greedy answer to `question` on a copy of `state` (the state is left as it was)."""
    answer = question.answer.encode()
    params = SamplingParams(temperature=0.0, max_new_tokens=len(answer), seed=0)
    output = bytes(engine.generate(state.clone(), question.question, params))
    return output.decode("utf-8", errors="replace")


# ---- summaries ---------------------------------------------------------------------------------


def accuracy(results: Sequence[FactResult]) -> float:
    return sum(r.correct for r in results) / len(results) if results else float("nan")


def other_key_share(results: Sequence[FactResult]) -> float:
    """Share of questions answered with another key's value."""
    return sum(r.other_key for r in results) / len(results) if results else float("nan")


def depth_bucket(depth: float) -> int:
    return min(DEPTH_BUCKETS - 1, int(depth * DEPTH_BUCKETS))


def summarize(results: Sequence[FactResult], phrasing: Phrasing | None = None) -> dict:
    """Accuracy sliced every way the report needs (each slice: accuracy and count); with the
    `phrasing` the facts were made by, also per statement, question and lead template
    ("other": composed or wrapped; exact for the held-out phrasing, approximate for the
    training one, whose templates overlap; none for a phrasing that composes every
    sentence)."""

    def table(key: Callable[[FactResult], object]) -> list[dict]:
        groups: dict[object, list[FactResult]] = defaultdict(list)
        for r in results:
            groups[key(r)].append(r)
        return [
            {"key": list(k) if isinstance(k, tuple) else k, "accuracy": accuracy(g), "n": len(g)}
            for k, g in sorted(groups.items(), key=lambda item: str(item[0]))
        ]

    slices = {
        "overall": {
            "accuracy": accuracy(results),
            "other_key": other_key_share(results),
            "n": len(results),
        },
        "by_haystack_length_facts": table(lambda r: (r.haystack, r.length, r.n_facts)),
        "by_kind": table(lambda r: r.kind),
        "by_length_depth": table(lambda r: (r.length, depth_bucket(r.depth))),
        "by_facts": table(lambda r: r.n_facts),
        "revised": table(lambda r: r.revised),
    }
    composed_only = phrasing is not None and phrasing.grammar and phrasing.grammar.share >= 1
    if phrasing is not None and not composed_only:  # composed sentences have no template
        slices["by_statement"] = table(lambda r: phrasing.statement_template(r.stated) or "other")
        asked = {r.asked: phrasing.question_templates(r.asked) for r in results}
        slices["by_question"] = table(lambda r: asked[r.asked][0] or "other")
        slices["by_lead"] = table(lambda r: asked[r.asked][1] or "other")
    return slices


def result_dicts(results: Sequence[FactResult]) -> list[dict]:
    return [asdict(r) for r in results]
