"""SamplingParams validation and sample_next's filters."""

from __future__ import annotations

import pytest
import torch

from memsvc.engine import SamplingParams, sample_next
from memsvc.model.tokenizer import BOS_ID, EOS_ID, PAD_ID, QUERY_ID, VOCAB_SIZE


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature must be a finite number >= 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
        ({"temperature": True}, "temperature must be a finite number >= 0"),
        ({"top_k": 0}, "top_k must be an integer >= 1 or None, got 0"),
        ({"top_k": 2.0}, "top_k must be an integer >= 1 or None, got 2.0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
        ({"stop": b"end"}, "stop must be a sequence of byte strings, got a single bytes"),
        ({"stop": ["end"]}, r"stop\[0\] must be bytes, got str 'end'"),
        ({"stop": [b"ok", b""]}, r"stop\[1\] is empty"),
        ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*64\) or None, got -1"),
    ],
)
def test_invalid_params_are_rejected_with_a_precise_message(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^SamplingParams: {message}"):
        SamplingParams(**kwargs)


def test_stop_sequences_become_a_tuple() -> None:
    params = SamplingParams(stop=[b"\n\n", b"END"])
    assert params.stop == (b"\n\n", b"END")
    hash(params)  # frozen and hashable


def _logits(seed: int, batch: int = 64) -> torch.Tensor:
    return torch.randn(batch, VOCAB_SIZE, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_and_top_k_1_are_the_argmax_over_allowed_ids() -> None:
    logits = _logits(0)
    logits[:5, PAD_ID] = 100.0  # a special id that must never win
    allowed = logits.clone()
    allowed[:, [PAD_ID, BOS_ID, QUERY_ID]] = float("-inf")
    want = allowed.argmax(-1)
    g = torch.Generator().manual_seed(0)
    greedy = sample_next(logits, SamplingParams(temperature=0), g)
    top1 = sample_next(logits, SamplingParams(temperature=1.7, top_k=1), g)
    assert torch.equal(greedy, want)
    assert torch.equal(top1, want)


def test_special_ids_are_never_sampled_and_eos_only_when_allowed() -> None:
    logits = torch.zeros(4096, VOCAB_SIZE)
    logits[:, 256:] = 5.0  # specials far more likely than any byte
    g = torch.Generator().manual_seed(1)
    with_eos = sample_next(logits, SamplingParams(), g)
    assert set(with_eos.tolist()) <= set(range(256)) | {EOS_ID}
    assert (with_eos == EOS_ID).any()
    without = sample_next(logits, SamplingParams(allow_eos=False), g)
    assert int(without.max()) < 256


def test_top_k_and_top_p_only_sample_inside_their_sets() -> None:
    logits = _logits(2, batch=1).expand(2000, -1)
    g = torch.Generator().manual_seed(2)
    top5 = set(logits[0, :256].topk(5).indices.tolist())
    got = sample_next(logits, SamplingParams(top_k=5, allow_eos=False), g)
    assert set(got.tolist()) <= top5
    assert len(set(got.tolist())) > 1

    probs = logits[0, :256].softmax(-1)
    order = probs.argsort(descending=True)
    mass_before = probs[order].cumsum(0) - probs[order]
    nucleus = set(order[mass_before < 0.5].tolist())  # smallest set reaching 0.5
    got = sample_next(logits, SamplingParams(top_p=0.5, allow_eos=False), g)
    assert set(got.tolist()) <= nucleus
    assert len(set(got.tolist())) == len(nucleus) > 1


def test_the_seed_fixes_the_draw() -> None:
    logits = _logits(3)
    params = SamplingParams(temperature=0.9, top_p=0.95)
    a = sample_next(logits, params, torch.Generator().manual_seed(7))
    b = sample_next(logits, params, torch.Generator().manual_seed(7))
    c = sample_next(logits, params, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
