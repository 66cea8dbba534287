"""Keyed-fact samples and probes: exact lengths, answers where the masks say, revisions
(latest value wins), statements beyond the window, and a held-out phrasing that shares
nothing with the training one."""

from __future__ import annotations

import itertools
import random
import re

import pytest

from memsvc.model.tokenizer import EOS_ID, QUERY_ID, decode
from memsvc.train.facts import make_fact_probe, make_facts
from memsvc.train.haystack import HAYSTACKS
from memsvc.train.phrasing import HELDOUT_PHRASING, TRAIN_PHRASING, VALUE_KINDS
from memsvc.train.tasks import TaskSpec, sample

VALUE_SHAPES = {
    "digits": r"[1-9][0-9]{4,9}",
    "words": r"[a-z]{4,16}",
    "code": r"(?=.*[0-9])(?=.*[A-Z])[A-Z0-9]{6,12}",
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
}


@pytest.mark.parametrize("haystack", ["sentences", "real:chinese", "real:json"])
@pytest.mark.parametrize("length", [512, 2048])
def test_training_sample_is_exact_and_answers_sit_after_their_questions(
    haystack: str, length: int
) -> None:
    for seed in range(6):
        spec = TaskSpec("facts", length, haystack=haystack, needle="out_of_window",
                        max_facts=6, distractor_rate=0.2)  # fmt: skip
        s = sample(spec, seed)
        assert len(s.tokens) == length and int(s.tokens[-1]) == EOS_ID
        context_end = s.questions[0][0]
        for (q0, q1), (a0, a1), text in zip(s.questions, s.answers, s.answer_texts, strict=True):
            assert int(s.tokens[q0]) == QUERY_ID and q1 == a0
            assert decode(s.tokens[a0:a1].tolist()) == text
            # the value was stated beyond the window of the question
            stated = decode(s.tokens[:context_end].tolist()).rfind(text)
            assert stated >= 0 and context_end - stated > spec.window


def test_revised_facts_answer_the_latest_value_and_state_both() -> None:
    rng = random.Random(3)
    facts = make_facts(rng, "train", 6, VALUE_KINDS, revised=3)
    for fact in facts[:3]:
        assert fact.revision is not None and fact.answer in fact.revision
        assert fact.answer not in fact.statement
    for fact in facts[3:]:
        assert fact.revision is None and fact.answer in fact.statement
    assert len({f.key for f in facts}) == 6


@pytest.mark.parametrize("kind", VALUE_KINDS)
def test_values_have_their_documented_shape(kind: str) -> None:
    rng = random.Random(0)
    for _ in range(50):
        assert re.fullmatch(VALUE_SHAPES[kind], TRAIN_PHRASING.value(kind, rng))


def test_heldout_phrasing_shares_no_template_key_or_attribute_with_training() -> None:
    for field in ("names", "projects", "places", "statements", "revisions", "questions", "leads"):
        assert not set(getattr(TRAIN_PHRASING, field)) & set(getattr(HELDOUT_PHRASING, field))
    for kind in VALUE_KINDS:
        assert not set(TRAIN_PHRASING.attributes[kind]) & set(HELDOUT_PHRASING.attributes[kind])


def test_made_up_training_names_never_make_a_heldout_key() -> None:
    syllables = TRAIN_PHRASING.name_syllables
    made_up = {
        "".join(parts).capitalize()
        for k in (2, 3)
        for parts in itertools.product(syllables, repeat=k)
    }
    assert len(made_up) > 5000  # the generator's breadth, not a handful of names
    heldout = set(HELDOUT_PHRASING.names) | set(HELDOUT_PHRASING.projects)
    assert not made_up & heldout
    rng = random.Random(0)
    keys = {TRAIN_PHRASING.key(rng) for _ in range(2000)}
    assert {k.removeprefix("project ") for k in keys} & made_up  # they are drawn
    assert not any(k.removeprefix("project ") in heldout for k in keys)


def test_training_statements_wrap_openers_and_closers_without_breaking_the_value() -> None:
    rng = random.Random(5)
    openers = set()
    for _ in range(300):
        text = TRAIN_PHRASING.statement(rng, "project Quartz", "serial", "K7Q2X9")
        assert "K7Q2X9" in text
        opener = next((o for o in TRAIN_PHRASING.openers if o and text.startswith(_cap(o))), "")
        # sentence-initial keys are capitalised; after an opener the key keeps its case
        assert "project Quartz" in text if opener else "roject Quartz" in text
        openers.add(opener)
    assert len(openers) == len(set(TRAIN_PHRASING.openers))  # every opener, and none


def test_training_questions_wrap_asks_and_keep_the_key_and_attribute() -> None:
    rng = random.Random(7)
    asks, leads = set(), set()
    for _ in range(600):
        text = TRAIN_PHRASING.question(rng, "project Quartz", "serial")
        assert "roject Quartz" in text and "erial" in text
        assert text[:1].isupper()
        asks.add(next((a for a in TRAIN_PHRASING.asks if a and text.startswith(_cap(a))), ""))
        leads.add(text)
    assert len(asks) == len(set(TRAIN_PHRASING.asks))  # every ask is drawn
    assert len(leads) > 400  # the breadth of the questions, not a few dozen
    # the held-out generator has no asks, so it draws nothing for them (its probes stay)
    assert HELDOUT_PHRASING.asks == ("",)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def test_probe_is_deterministic_with_every_statement_beyond_the_window() -> None:
    probe = make_fact_probe(4, 3000, 8, ("digits", "code"), window=128, revised=2,
                            haystack="real:english")  # fmt: skip
    again = make_fact_probe(4, 3000, 8, ("digits", "code"), window=128, revised=2,
                            haystack="real:english")  # fmt: skip
    assert probe.context.equal(again.context) and len(probe.context) == 3000
    text = decode(probe.context.tolist()).encode()
    assert sum(q.revised for q in probe.questions) == 2
    for q in probe.questions:
        at = text.rfind(q.answer.encode())  # the latest statement of the value
        assert at >= 0 and len(text) - at > 128
        assert 0 < q.depth < 1 and int(q.question[0]) == QUERY_ID


def test_every_haystack_is_accepted_and_unknown_ones_refused() -> None:
    for haystack in HAYSTACKS:
        assert len(sample(TaskSpec("facts", 1024, haystack=haystack), 0).tokens) == 1024
    with pytest.raises(ValueError, match="unknown haystack"):
        TaskSpec("facts", 1024, haystack="real:klingon")


def test_each_heldout_sentence_is_traced_to_its_own_template() -> None:
    # (the training phrasing's templates overlap: "{attr}: " is also "{Keys} {attr}: " with a
    # one-word key, so its per-template report is approximate; the goals are held-out)
    phrasing = HELDOUT_PHRASING
    key, attr, value = "Beatrix", "room code", "48213"
    for template in phrasing.statements + phrasing.revisions:
        text = phrasing.render(template, key, attr, value)
        assert phrasing.statement_template(text) == template
    for question in phrasing.questions:
        for lead in phrasing.leads:
            text = phrasing.render(question, key, attr) + " " + phrasing.render(lead, key, attr)
            assert phrasing.question_templates(text) == (question, lead)
    assert phrasing.statement_template("Beatrix's room code: 48213, composed.") is None
