"""Probes: exact lengths, one needle beyond the window, the same for a seed, any piece size."""

from __future__ import annotations

import pytest
import torch

from memsvc.eval.probe import ProbeSpec, make_probe
from memsvc.model.tokenizer import BOS_ID, decode


@pytest.mark.parametrize("kind", ["passkey", "number", "uuid"])
@pytest.mark.parametrize("length", [1024, 5000])
def test_probe_has_exact_length_and_one_needle_beyond_the_window(kind: str, length: int) -> None:
    for seed in range(3):
        probe = make_probe(ProbeSpec(kind, length, window=128, distractor_rate=0.2), seed)
        ids = torch.cat(list(probe.context(piece_tokens=777)))
        assert ids[0] == BOS_ID and (ids[1:] < 256).all()
        assert len(ids) == probe.context_length
        total = len(ids) + len(probe.question) + len(probe.answer.encode())
        assert total == length
        text = decode(ids)
        assert text.count(probe.needle) == 1
        needle_end = text.index(probe.needle) + len(probe.needle) + 1  # + BOS
        first_answer_position = len(ids) + len(probe.question)
        assert first_answer_position - needle_end > 128  # no answer byte sees the needle


def test_probe_is_the_same_for_a_seed_whatever_the_piece_size() -> None:
    spec = ProbeSpec("number", 3000, window=128, haystack="words")
    a, b = make_probe(spec, 7), make_probe(spec, 7)
    assert (a.answer, a.needle_at, a.needle) == (b.answer, b.needle_at, b.needle)
    assert torch.equal(a.question, b.question)
    whole = torch.cat(list(a.context(piece_tokens=1 << 16)))
    assert torch.equal(whole, torch.cat(list(b.context(piece_tokens=64))))
    assert make_probe(spec, 8).answer != a.answer


def test_probe_too_short_for_the_window_is_refused() -> None:
    with pytest.raises(ValueError, match="too short"):
        make_probe(ProbeSpec("passkey", 300, window=128), 0)
