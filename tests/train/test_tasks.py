"""Synthetic recall tasks: deterministic, exact lengths, spans that hold the answer, needles
where they were asked to be, and a held-out haystack that shares no words with training."""

from __future__ import annotations

import random
import re

import pytest
import torch

from memsvc.model.tokenizer import BOS_ID, EOS_ID, QUERY_ID, decode, encode
from memsvc.train.haystack import HELDOUT_VOCAB, TRAIN_VOCAB
from memsvc.train.tasks import (
    TaskSpec,
    collate,
    reference_curriculum,
    sample,
)

SPECS = [
    TaskSpec("passkey", 300, haystack="repeated"),
    TaskSpec("passkey", 700, haystack="sentences", distractor_rate=0.3),
    TaskSpec("number", 500, haystack="words"),
    TaskSpec("uuid", 600, vocabulary="heldout"),
    TaskSpec("mqar", 257, n_queries=5),
    TaskSpec("text", 200),
]


def longest_unit() -> int:
    """Bytes of the longest sentence the generators can write (bounds needle snapping)."""
    rng = random.Random(0)
    longest = max(len(w) for v in (TRAIN_VOCAB, HELDOUT_VOCAB) for w in v.content_words())
    sentences = (
        v.fill(rng, t, number="1234567")
        for v in (TRAIN_VOCAB, HELDOUT_VOCAB)
        for t in v.templates + v.distractors
        for _ in range(50)
    )
    return max(longest, *map(len, sentences)) + 1


LONGEST_UNIT = longest_unit()


def text(tokens: torch.Tensor) -> str:
    return decode(tokens.tolist())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-{s.haystack}")
def test_deterministic_per_seed_and_exact_length(spec: TaskSpec) -> None:
    a, b, c = sample(spec, 7), sample(spec, 7), sample(spec, 8)
    assert (a.answers, a.questions, a.needle) == (b.answers, b.questions, b.needle)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)
    assert len(a.tokens) == spec.length
    assert a.tokens[0] == BOS_ID


@pytest.mark.parametrize("spec", SPECS[:-1], ids=lambda s: f"{s.kind}-{s.haystack}")
def test_answer_and_question_spans(spec: TaskSpec) -> None:
    for seed in range(10):
        s = sample(spec, seed)
        assert len(s.answers) == len(s.questions) == len(s.answer_texts) >= 1
        for (qs, qe), (as_, ae), answer in zip(s.questions, s.answers, s.answer_texts, strict=True):
            assert qe == as_  # the answer follows its question prompt
            assert s.tokens[qs] == QUERY_ID
            assert s.tokens[as_:ae].tolist() == encode(answer)
        if spec.kind != "mqar":
            assert s.tokens[-1] == EOS_ID and s.answers[-1][1] == len(s.tokens) - 1
            needle = text(s.tokens[slice(*s.needle)])
            assert s.answer_texts[0] in needle
            # the answer appears in the context only inside the needle
            context = text(s.tokens[: s.questions[0][0]])
            assert context.count(s.answer_texts[0]) == 1


def test_passkey_needle_text_and_question() -> None:
    s = sample(TaskSpec("passkey", 400), 3)
    key = s.answer_texts[0]
    assert re.fullmatch(r"\d{5}", key)
    assert text(s.tokens[slice(*s.needle)]) == f"The pass key is {key}. Remember it. "
    assert text(s.tokens[slice(*s.questions[0])]) == "What is the pass key? The pass key is "


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("haystack", ["repeated", "sentences", "words"])
def test_needle_sits_at_the_requested_depth(depth: float, haystack: str) -> None:
    spec = TaskSpec("passkey", 2000, haystack=haystack, depth=depth)
    for seed in range(3):
        s = sample(spec, seed)
        context = s.questions[0][0] - 1 - (s.needle[1] - s.needle[0])  # haystack bytes
        offset = s.needle[0] - 1
        assert abs(offset - depth * context) <= LONGEST_UNIT


@pytest.mark.parametrize("kind", ["passkey", "number"])
def test_window_placement(kind: str) -> None:
    w = 128
    for seed in range(30):
        inside = sample(TaskSpec(kind, 1024, needle="in_window", window=w), seed)
        assert inside.answers[0][0] - inside.needle[0] <= w
        outside = sample(TaskSpec(kind, 1024, needle="out_of_window", window=w), seed)
        assert outside.answers[0][0] - outside.needle[1] > w
    with pytest.raises(ValueError, match="too short"):
        sample(TaskSpec(kind, 150, needle="out_of_window", window=w), 0)
    with pytest.raises(ValueError, match="do not fit"):
        sample(TaskSpec("uuid", 1024, needle="in_window", window=w), 0)


def haystack_text(s) -> str:
    """The context without the needle."""
    return text(s.tokens[: s.needle[0]]) + text(s.tokens[s.needle[1] : s.questions[0][0]])


def test_distractors_add_numbers_only_when_asked() -> None:
    plain = sample(TaskSpec("passkey", 3000, distractor_rate=0.0), 0)
    noisy = sample(TaskSpec("passkey", 3000, distractor_rate=0.3), 0)
    assert re.findall(r"\d{5}", haystack_text(plain)) == []
    assert len(re.findall(r"\b\d{5}\b", haystack_text(noisy))) >= 5


def test_heldout_generator_shares_no_words_with_training() -> None:
    train, held = TRAIN_VOCAB.content_words(), HELDOUT_VOCAB.content_words()
    assert len(train) > 150 and len(held) > 150
    assert not train & held
    assert not set(TRAIN_VOCAB.templates) & set(HELDOUT_VOCAB.templates)
    for haystack in ("sentences", "words"):
        s = sample(TaskSpec("text", 4000, haystack=haystack, vocabulary="heldout"), 0)
        words = set(re.findall(r"[a-z]+", text(s.tokens).lower()))
        assert not words & train, words & train
        assert len(words & held) > 50


def test_mqar_answers_are_the_values_of_the_queried_keys() -> None:
    s = sample(TaskSpec("mqar", 400, n_queries=6), 1)
    pairs = dict(re.findall(r"([a-z]{4})=(\d{4}) ", text(s.tokens[: s.questions[0][0]])))
    assert len(pairs) >= 30
    for (qs, qe), answer in zip(s.questions, s.answer_texts, strict=True):
        key = text(s.tokens[qs + 1 : qe]).rstrip("=")
        assert pairs[key] == answer


def test_collate_shifts_targets_and_masks_answers() -> None:
    samples = [sample(TaskSpec("passkey", 300), 0), sample(TaskSpec("mqar", 250), 0)]
    batch = collate(samples)
    assert batch.inputs.shape == batch.targets.shape == (2, 299)
    for i, s in enumerate(samples):
        n = len(s.tokens)
        assert torch.equal(batch.inputs[i, : n - 1], s.tokens[:-1])
        assert torch.equal(batch.targets[i, : n - 1], s.tokens[1:])
        assert batch.text_mask[i].sum() == n - 1
        answers = "".join(s.answer_texts)
        assert decode(batch.targets[i][batch.answer_mask[i]].tolist()) == answers


def test_reference_curriculum_starts_inside_the_window_and_grows() -> None:
    stages = reference_curriculum(window=128)
    assert stages[0].needle == "in_window" and stages[0].length <= 2 * 128
    assert any(s.needle == "out_of_window" for s in stages)
    assert stages[-1].length >= 8192 and stages[-1].distractor_rate > 0
    batch = stages[0].batch(128, seed=0)
    assert batch.inputs.shape == (stages[0].batch_size, stages[0].length - 1)
    assert torch.equal(batch.inputs, stages[0].batch(128, seed=0).inputs)
    assert int(batch.answer_mask.sum()) == 5 * stages[0].batch_size


@pytest.mark.parametrize("name", ["facts", "long-mixed"])
def test_fine_tuning_curricula_build_their_batches(name: str) -> None:
    """Every stage of the facts and long-mixed curricula builds full-length batches on
    the committed corpus sample; the facts stages start with short values only."""
    from memsvc.train.recipe import curriculum

    stages = curriculum(128, None, name)
    for stage in stages[:3]:  # the long ones are the same code at 16k and 32k
        batch = stage.batch(128, seed=1)
        assert batch.inputs.shape == (stage.batch_size, stage.length - 1)
        assert int(batch.answer_mask.sum()) > 0
    if name == "facts":
        assert stages[0].kinds == ("facts",) and stages[0].value_kinds == ("digits", "words")
        answers = stages[1].batch(128, seed=2)
        texts = decode(answers.targets[answers.answer_mask].tolist())
        assert "-" not in texts  # no UUIDs in the short-value stages
    else:
        assert [s.length for s in stages] == [8192, 16384, 32768]


def test_the_128k_stage_builds_one_long_sample_per_step_from_real_and_synthetic_text() -> None:
    from memsvc.train.recipe import curriculum

    stages = curriculum(128, None, "long-128k")
    assert [(s.length, s.batch_size) for s in stages] == [(32768, 2), (65536, 1), (131072, 1)]
    assert all(s.needle == "out_of_window" and "real:english" in s.haystacks for s in stages)
    batch = stages[-1].batch(128, seed=3)
    assert batch.inputs.shape == (1, 131071)
    answer_at = batch.answer_mask.nonzero()[:, 1]
    assert answer_at.min() > 131072 - 256  # asked at the end of the 128k sample
