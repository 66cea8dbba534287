"""Byte-level tokenizer: exact round trips, specials skipped, invalid UTF-8 replaced."""

from __future__ import annotations

import pytest

from memsvc.model import tokenizer as tok

TEXTS = [
    "",
    "The pass key is 12345. Remember it.",
    "Grüße aus Köln, ça va? Ñandú.",
    "日本語のテキストと中文",
    "emoji 🧠💾 and math ∑∫√ and RTL שלום",
    "tabs\tnewlines\nnul\x00",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_ids_are_the_utf8_bytes(text: str) -> None:
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    framed = tok.encode(text, bos=True, eos=True)
    assert framed[0] == tok.BOS_ID and framed[-1] == tok.EOS_ID
    assert tok.decode(framed) == text


def test_special_ids_are_distinct_above_the_bytes_and_skipped_by_decode() -> None:
    specials = list(tok.SPECIAL_IDS.values())
    assert len(set(specials)) == len(specials)
    assert all(tok.N_BYTES <= i < tok.VOCAB_SIZE for i in specials)
    assert tok.N_BYTES + len(specials) == tok.VOCAB_SIZE
    assert all(tok.is_special(i) for i in specials) and not tok.is_special(255)
    ids = [tok.BOS_ID, *tok.encode("ab"), tok.QUERY_ID, *tok.encode("c"), tok.PAD_ID, tok.EOS_ID]
    assert tok.decode(ids) == "abc"


def test_invalid_utf8_is_replaced_not_raised() -> None:
    # a truncated 3-byte sequence, a lone continuation byte, and an overlong encoding
    assert tok.decode([0xE6, 0x97, ord("x")]) == "\ufffdx"
    assert tok.decode([ord("a"), 0x80, ord("b")]) == "a\ufffdb"
    assert "\ufffd" in tok.decode([0xC0, 0xAF])
    # specials are dropped before the bytes are decoded: bytes around one still join
    euro = tok.encode("€")
    assert tok.decode([euro[0], tok.EOS_ID, *euro[1:]]) == "€"


@pytest.mark.parametrize("bad", [-1, tok.VOCAB_SIZE, 10**6])
def test_ids_outside_the_vocabulary_are_rejected(bad: int) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([65, bad])
