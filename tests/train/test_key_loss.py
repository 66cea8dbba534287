"""The key-alignment loss: its links point at the facts' values, it is the documented
softmax, and a trainer with it on steps and changes what it should."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from memsvc.model.tokenizer import decode
from memsvc.train.facts import _links, make_facts, value_first
from memsvc.train.key_loss import (
    BACKGROUND_WEIGHT,
    key_alignment_loss,
    linear_key_loss,
    spread_key_loss,
)
from memsvc.train.recipe import TrainRecipe, model_config
from memsvc.train.tasks import Stage, TaskSpec, collate, sample
from memsvc.train.trainer import Trainer


@pytest.mark.parametrize("haystack", ["sentences", "real:code"])
def test_links_pair_each_answer_byte_with_the_same_byte_of_its_stated_value(haystack: str) -> None:
    linked = 0
    for seed in range(8):
        spec = TaskSpec("facts", 2048, haystack=haystack, needle="out_of_window", max_facts=6)
        s = sample(spec, seed)
        tokens = s.tokens.tolist()
        context_end = s.questions[0][0]
        reads = dict(s.fact_reads)
        assert len(reads) == len(s.fact_reads)  # one link per read position
        for (a0, a1), text in zip(s.answers, s.answer_texts, strict=True):
            if a0 - 1 not in reads:  # stated value first: none of its bytes is linked
                assert not any(p in reads for p in range(a0 - 1, a1 - 1))
                continue
            linked += 1
            writes = [s.fact_writes[reads[p]] for p in range(a0 - 1, a1 - 1)]
            assert writes == list(range(writes[0], writes[0] + a1 - a0))  # one run of bytes
            assert decode(tokens[writes[0] + 1 : writes[-1] + 2]) == text
            assert writes[-1] < context_end  # written in the context, before any question
    assert linked >= 16


def test_facts_stated_value_first_have_no_links_and_the_rest_do() -> None:
    # lookahead keys file a value byte under what came before it: where the statement gives
    # the value before the key, no write key can carry the key, so the loss leaves it out
    rng = random.Random(0)
    facts = make_facts(rng, "grammar-value-first", 600, ("digits", "code"))
    first = [f for f in facts if value_first(f)]
    for fact in facts:  # what value_first says, read off the sentence itself
        text = fact.statement.lower()
        assert value_first(fact) == (text.index(fact.answer.lower()) < text.index(fact.key.lower()))
    assert 0.1 < len(first) / len(facts) < 0.3  # about one statement in six
    mixed = [first[0], next(f for f in facts if not value_first(f)), first[1]]
    at = (10, 200, 400)
    questions = [(900 + 40 * i, 930 + 40 * i) for i in range(3)]
    links = _links(mixed, at, questions, [0, 1, 2])
    size = len(mixed[1].answer)
    assert len(links["fact_writes"]) == len(links["fact_reads"]) == size  # fact 1 only
    answer_start = questions[1][1]  # each answer byte is read at the position before it
    assert [r for r, _ in links["fact_reads"]] == list(
        range(answer_start - 1, answer_start + size - 1)
    )


def test_collate_numbers_write_rows_across_samples() -> None:
    spec = TaskSpec("facts", 1024, needle="out_of_window", max_facts=4)
    samples = [sample(spec, seed) for seed in range(3)]
    batch = collate(samples)
    assert batch.fact_writes.shape == (sum(len(s.fact_writes) for s in samples), 2)
    for b, position, row in batch.fact_reads.tolist():
        assert batch.fact_writes[row, 0] == b  # a read's target is its own sample's fact
        assert position < batch.inputs.shape[1] and batch.fact_writes[row, 1] < position
    # No facts, no links: the needle tasks add none.
    empty = collate([sample(TaskSpec("passkey", 512), 0)])
    assert empty.fact_writes.shape == (0, 2) and empty.fact_reads.shape == (0, 3)


def test_the_loss_is_the_documented_softmax_over_the_batchs_facts() -> None:
    torch.manual_seed(0)
    heads, d, t = 2, 4, 10
    q = F.normalize(torch.randn(2 * heads, t, d), dim=-1)  # 2 samples
    writes = torch.tensor([[0, 1], [0, 3], [1, 2], [1, 5]])
    reads = torch.tensor([[0, 8, 1], [1, 9, 2]])
    got = key_alignment_loss([q], heads, writes, reads, temperature=0.5)
    qq = q.view(2, heads, t, d)
    want = 0.0
    for b, pos, target in reads.tolist():
        logits = [(qq[b, :, pos] * qq[wb, :, wp]).sum(-1).mean() / 0.5 for wb, wp in writes]
        want += -torch.log_softmax(torch.stack(logits), 0)[target]
    torch.testing.assert_close(got, want / 2)
    assert key_alignment_loss([q], heads, writes, reads[:0], 0.5) is None


def test_the_linear_loss_is_own_cosine_and_the_background_of_earlier_keys() -> None:
    torch.manual_seed(1)
    heads, d, t = 2, 4, 12
    q = F.normalize(torch.randn(2 * heads, t, d), dim=-1)
    writes = torch.tensor([[0, 1], [0, 3], [1, 2]])
    reads = torch.tensor([[0, 8, 1], [0, 10, 0], [1, 11, 2]])
    got = linear_key_loss([q], heads, writes, reads)
    qq = q.view(2, heads, t, d)
    terms = []
    for b, pos, row in reads.tolist():
        wb, wp = writes[row].tolist()
        for h in range(heads):
            own = float(qq[b, h, pos] @ qq[wb, h, wp])
            background = sum(float(qq[b, h, pos] @ qq[b, h, j]) ** 2 for j in range(pos)) / pos
            terms.append((1 - own) + BACKGROUND_WEIGHT * background)
    assert float(got) == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert linear_key_loss([q], heads, writes, reads[:0]) is None


def test_a_trainer_with_the_key_loss_steps_and_keeps_it_off_by_default(tmp_path: Path) -> None:
    stage = Stage("facts", 320, "out_of_window", 100, 2, kinds=("facts",), max_facts=3,
                  value_kinds=("digits",))  # fmt: skip
    config = model_config("tiny")
    base = {"stages": (stage,), "max_steps": 2, "warmup_steps": 1, "log_every": 1000,
            "checkpoint_every": 1000}  # fmt: skip
    off = Trainer.create(config, TrainRecipe(**base), tmp_path / "off")
    assert off.memories == [] and not any(
        getattr(m, "keep_queries", False) for m in off.model.modules()
    )
    on = Trainer.create(config, TrainRecipe(**base, key_loss_weight=1.0), tmp_path / "on")
    assert len(on.memories) == config.n_layers
    a, b = off.step(), on.step()  # same weights, same batch: the loss differs by the term
    assert a.answer_loss == pytest.approx(b.answer_loss, rel=1e-5)
    assert b.loss > a.loss and math.isfinite(b.loss)


def test_both_kinds_add_the_softmax_and_the_linear_loss() -> None:
    from types import SimpleNamespace

    from memsvc.train.key_loss import with_key_loss

    torch.manual_seed(2)
    heads, d, t = 2, 4, 12
    q = F.normalize(torch.randn(2 * heads, t, d), dim=-1)
    memory = SimpleNamespace(last_queries=q, config=SimpleNamespace(heads=heads))
    batch = SimpleNamespace(
        fact_writes=torch.tensor([[0, 1], [0, 3], [1, 2]]),
        fact_reads=torch.tensor([[0, 8, 1], [1, 11, 2]]),
    )
    stage = Stage("facts", 320, "out_of_window", 1, 1, kinds=("facts",))
    loss = {
        kind: with_key_loss(
            torch.zeros(()),
            [memory],
            batch,
            TrainRecipe(stages=(stage,), key_loss_weight=2.0, key_loss_kind=kind),
        )
        for kind in ("softmax", "linear", "both", "spread")
    }
    torch.testing.assert_close(loss["both"], loss["softmax"] + loss["linear"])
    spread = spread_key_loss([q], heads, batch.fact_writes)
    assert spread is not None
    torch.testing.assert_close(loss["spread"], loss["softmax"] + 2.0 * spread)
    assert float(loss["softmax"]) > 0 and float(loss["linear"]) > 0 and float(spread) > 0


def test_the_spread_loss_is_the_squared_cosine_between_a_samples_different_write_keys() -> None:
    torch.manual_seed(3)
    heads, d, t = 2, 4, 12
    q = F.normalize(torch.randn(3 * heads, t, d), dim=-1)  # 3 samples, the last writes one byte
    writes = torch.tensor([[0, 1], [0, 3], [0, 4], [1, 2], [1, 7], [2, 5]])
    got = spread_key_loss([q], heads, writes)
    qq = q.view(3, heads, t, d)
    per_sample = []
    for b in (0, 1):
        positions = [p for wb, p in writes.tolist() if wb == b]
        pairs = [(i, j) for i in positions for j in positions if i != j]
        per_sample.append(
            sum(float(qq[b, h, i] @ qq[b, h, j]) ** 2 for i, j in pairs for h in range(heads))
            / (len(pairs) * heads)
        )
    assert float(got) == pytest.approx(BACKGROUND_WEIGHT * sum(per_sample) / 2, rel=1e-5)
    # Orthogonal keys cost nothing; one sample writing a single byte gives no loss.
    eye = torch.eye(d).repeat(heads, 1, 1)  # (H, d, d): position p's key is axis p
    assert float(spread_key_loss([eye], heads, torch.tensor([[0, 0], [0, 1], [0, 3]]))) == 0
    assert spread_key_loss([q], heads, writes[-1:]) is None
