"""Byte-level tokenizer: UTF-8 bytes 0-255 plus a few special ids.

No vocabulary file and no download: any language, any text. Special ids sit
above the bytes, so a token id below 256 is always the byte of the same value.
"""

from __future__ import annotations

from collections.abc import Iterable

N_BYTES = 256
PAD_ID = 256  # fills batches of unequal length; never a training target
BOS_ID = 257  # start of a stream
EOS_ID = 258  # end of an answer or a document
QUERY_ID = 259  # separates a context from the question about it
SPECIAL_IDS = {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID, "query": QUERY_ID}
VOCAB_SIZE = 260


def encode(text: str, bos: bool = False, eos: bool = False) -> list[int]:
    """The UTF-8 bytes of `text` as token ids, optionally framed by BOS / EOS."""
    ids = list(text.encode("utf-8"))
    if bos:
        ids.insert(0, BOS_ID)
    if eos:
        ids.append(EOS_ID)
    return ids


def decode(ids: Iterable[int]) -> str:
    """Text from token ids: special ids are skipped, invalid UTF-8 becomes U+FFFD."""
    data = bytearray()
    for i in ids:
        i = int(i)
        if not 0 <= i < VOCAB_SIZE:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {VOCAB_SIZE})")
        if i < N_BYTES:
            data.append(i)
    return data.decode("utf-8", errors="replace")


def is_special(token_id: int) -> bool:
    return N_BYTES <= token_id < VOCAB_SIZE
