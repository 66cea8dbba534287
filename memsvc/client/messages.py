"""Request messages from Python values, and text from generated token ids.

Tokens are bytes (ids 0-255) plus special ids 256-259 (the contract in
proto/memsvc/v1/memsvc.proto), so the SDK needs no tokenizer.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence
from typing import Any

from memsvc.proto.v1 import memsvc_pb2 as pb

N_BYTES = 256

Data = str | bytes | Sequence[int]


def input_message(data: Data) -> pb.Input:
    """Text (str: its UTF-8; bytes: sent as they are, the server checks they are UTF-8)
    or token ids."""
    if isinstance(data, str):
        return pb.Input(text=data.encode("utf-8"))
    if isinstance(data, bytes | bytearray):
        return pb.Input(text=bytes(data))
    return pb.Input(token_ids=data)


def prompt_message(prompt: Data, sampling: dict[str, Any]) -> pb.Prompt:
    """A prompt with sampling options: temperature, top_k, top_p, max_new_tokens,
    stop (str or bytes each), allow_eos, seed; absent ones take the server's defaults."""
    options = dict(sampling)
    stop = [s.encode("utf-8") if isinstance(s, str) else s for s in options.pop("stop", ())]
    return pb.Prompt(input=input_message(prompt), params=pb.SamplingParams(stop=stop, **options))


class TextDecoder:
    """Generated ids to text as they arrive: special ids are dropped, and a UTF-8
    character split across messages is held until it is whole."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: Iterable[int]) -> str:
        return self._utf8.decode(bytes(i for i in ids if i < N_BYTES))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
