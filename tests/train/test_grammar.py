"""The composed training phrasing: broad, well-formed, and disjoint from the held-out one."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from memsvc.train import facts
from memsvc.train.facts import fact_sample, make_facts, value_first
from memsvc.train.grammar import HELDOUT_WORDS, Grammar
from memsvc.train.phrasing import GRAMMAR_PHRASING, HELDOUT_PHRASING, TRAIN_PHRASING
from memsvc.train.tasks import Stage

KEY, ATTR, VALUE = "project Quartz", "serial", "K7Q2X9"


def _templates(draw, n: int = 3000) -> set[str]:
    rng = random.Random(0)
    return {draw(rng) for _ in range(n)}


def test_no_part_says_what_the_heldout_phrasing_says() -> None:
    for part in Grammar.parts():
        for word in HELDOUT_WORDS:
            assert word not in part.lower(), (part, word)


def test_heldout_words_cover_the_heldout_templates_distinctive_words() -> None:
    # every held-out template contains one of HELDOUT_WORDS: none of its connectives can
    # be composed here by accident
    heldout = (
        HELDOUT_PHRASING.statements
        + HELDOUT_PHRASING.revisions
        + HELDOUT_PHRASING.questions
        + HELDOUT_PHRASING.leads
    )
    for template in heldout:
        assert any(word in template.lower() for word in HELDOUT_WORDS), template


@pytest.mark.parametrize("role", ["statement", "revision", "question", "lead"])
def test_composed_templates_are_many_and_none_is_a_heldout_one(role: str) -> None:
    grammar = Grammar()
    templates = _templates(getattr(grammar, role))
    assert len(templates) > 300  # thousands of sentences, not dozens
    heldout = set(getattr(HELDOUT_PHRASING, role + "s"))
    assert not templates & heldout


def test_composed_statements_name_the_key_and_attribute_before_the_value() -> None:
    # the memory writes a value byte under a key built from what came before it (lookahead
    # keys), so a statement that named its key after the value could not be learned
    composed_only = replace(GRAMMAR_PHRASING, grammar=Grammar(share=1.0))
    rng = random.Random(3)
    for _ in range(2000):
        for text in (
            composed_only.statement(rng, KEY, ATTR, VALUE),
            composed_only.revision(rng, KEY, ATTR, VALUE),
        ):
            assert text.count(VALUE) == 1, text
            value_at = text.index(VALUE)
            assert "roject Quartz" in text[:value_at], text


def test_composed_questions_name_the_key_and_attribute() -> None:
    rng = random.Random(4)
    for _ in range(2000):
        text = GRAMMAR_PHRASING.question(rng, KEY, ATTR)
        assert "roject Quartz" in text and "erial" in text, text
        assert "{" not in text and "}" not in text, text


def test_grammar_phrasing_draws_both_fixed_and_composed_sentences() -> None:
    rng = random.Random(5)
    fixed = {TRAIN_PHRASING.render(t, KEY, ATTR, VALUE) for t in TRAIN_PHRASING.statements}
    texts = [GRAMMAR_PHRASING.statement(rng, KEY, ATTR, VALUE) for _ in range(400)]
    plain = [t for t in texts if t in fixed]  # no opener or closer drawn
    assert plain and len(plain) < len(texts)
    assert any(t not in fixed and '"' in t for t in texts)  # a record, only composed


def test_a_stage_with_the_grammar_phrases_its_facts_with_it() -> None:
    stage = Stage("s", 1024, "out_of_window", 1, 4, kinds=("facts",), phrasing="grammar")
    assert all(spec.phrasing == "grammar" for spec in stage.specs(128))
    composed = 0
    for seed in range(20):
        common = dict(
            length=1024,
            max_facts=4,
            value_kinds=("digits",),
            haystack="sentences",
            vocabulary="train",
            distractor_rate=0.0,
            window=128,
            out_of_window=True,
        )
        with_grammar = fact_sample(random.Random(seed), phrasing="grammar", **common)
        without = fact_sample(random.Random(seed), **common)
        composed += int(with_grammar.tokens.tolist() != without.tokens.tolist())
    assert composed > 10  # the facts' sentences differ; the default draws as before


def test_an_unknown_phrasing_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown phrasing"):
        Stage("s", 1024, "out_of_window", 1, 4, kinds=("facts",), phrasing="nope").specs(128)


def test_a_long_composed_statement_is_redrawn_not_an_error_in_a_short_sample() -> None:
    # seed 7725 draws, at every fact count, sentences too long for 256 tokens (1 draw in
    # 20,000): a training run at a large batch met it in its first stage and stopped
    common = dict(
        value_kinds=("digits", "words"),
        haystack="sentences",
        vocabulary="train",
        distractor_rate=0.0,
        window=128,
        out_of_window=False,
        phrasing="grammar",
    )
    s = fact_sample(random.Random(7725), 256, max_facts=2, **common)
    assert s.tokens.shape == (256,) and s.answers
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(facts, "MAX_REDRAWS", 0)
        with pytest.raises(ValueError, match="too short"):
            fact_sample(random.Random(7725), 256, max_facts=2, **common)
    with pytest.raises(ValueError, match="too short"):  # a length no sentence fits still fails
        fact_sample(random.Random(0), 40, max_facts=1, **common)


def test_the_value_first_eval_phrasing_states_every_fact_value_first() -> None:
    rng = random.Random(6)
    facts = make_facts(rng, "value-first", 400, ("digits", "code"))
    assert all(value_first(f) for f in facts)
    assert len({f.statement.split()[0] for f in facts}) > 10  # composed, not one template
