"""Needle-in-a-haystack probes of any length, generated piece by piece in constant memory.

A probe is the stream

    BOS haystack[:at] needle haystack[at:] | QUERY question | answer

of exactly `length` tokens (the answer counted, as in training samples), the
needle at a unit boundary beyond the attention window of the question. The
haystack is produced unit by unit from a seeded generator while the
evaluation streams it, so a 2M-token probe never exists in memory at once:
that is what lets peak RSS stay flat from 64k to 2m tokens.

By default the haystack uses the held-out vocabulary (words and templates the
model never saw in training), so a correct answer is recall, not a memorised
filler pattern.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from memsvc.model.tokenizer import BOS_ID, QUERY_ID, encode
from memsvc.train.haystack import VOCABULARIES, Haystack, filler
from memsvc.train.tasks import needle_parts

NeedleKind = Literal["passkey", "number", "uuid"]
PIECE_TOKENS = 1 << 16  # tokens per piece handed to the engine
_MAX_UNIT_BYTES = 256  # longer than any haystack unit: snapping to a boundary stays in range


@dataclass(frozen=True)
class ProbeSpec:
    kind: NeedleKind
    length: int  # tokens in all, answer included
    window: int  # the model's attention window: the needle ends beyond it
    haystack: Haystack = "sentences"
    vocabulary: Literal["train", "heldout"] = "heldout"
    distractor_rate: float = 0.0


@dataclass(frozen=True)
class Probe:
    """One probe: stream `context()`, then ask `question`; the right output is `answer`."""

    spec: ProbeSpec
    seed: int
    needle: str
    question: Tensor  # (Q,) int64: QUERY + the question prompt
    answer: str
    distractor_digits: int  # digits of the haystack's distractor numbers (like the answer's)
    hay_bytes: int  # haystack bytes around the needle
    needle_at: int  # the needle starts at the first haystack unit boundary at or after this

    @property
    def context_length(self) -> int:
        return 1 + self.hay_bytes + len(self.needle.encode())

    @property
    def depth(self) -> float:
        """Where the needle sits (to within one unit), as a fraction of the haystack."""
        return self.needle_at / max(1, self.hay_bytes)

    def context(self, piece_tokens: int = PIECE_TOKENS) -> Iterator[Tensor]:
        """The context as (n,) int64 pieces of `piece_tokens` (the last one shorter).

        The needle goes at the first haystack unit boundary at or after `needle_at`."""
        spec = self.spec
        vocab = VOCABULARIES[spec.vocabulary]
        rng = random.Random(f"haystack-{self.seed}")
        pending = [BOS_ID]  # ids not yet handed out
        emitted = 0
        needle_done = False
        units = filler(rng, spec.haystack, vocab, spec.distractor_rate, self.distractor_digits)
        while emitted < self.hay_bytes:
            if not needle_done and emitted >= self.needle_at:
                pending += self.needle.encode()
                needle_done = True
            data = next(units).encode()[: self.hay_bytes - emitted]
            pending += data
            emitted += len(data)
            while len(pending) >= piece_tokens:
                yield torch.tensor(pending[:piece_tokens], dtype=torch.int64)
                del pending[:piece_tokens]
        if not needle_done:  # unreachable: needle_at leaves room for a whole unit after it
            raise AssertionError("the haystack ended before the needle")
        if pending:
            yield torch.tensor(pending, dtype=torch.int64)


def make_probe(spec: ProbeSpec, seed: int) -> Probe:
    """The probe of `spec` for `seed` (the same on every machine).

    The needle's start is drawn uniformly over the positions that keep its end
    more than `window` tokens before the first answer token.
    """
    rng = random.Random(f"probe-{spec.kind}-{spec.length}-{seed}")
    needle, question, answer, digits = needle_parts(spec.kind, rng, spec.vocabulary)
    n_needle, n_question = len(needle.encode()), 1 + len(question.encode())
    hay = spec.length - 1 - n_needle - n_question - len(answer.encode())  # - BOS
    latest = hay + n_question - spec.window - 1 - _MAX_UNIT_BYTES  # needle end beyond W
    if hay < 0 or latest < 0:
        raise ValueError(
            f"length {spec.length} is too short for a {spec.kind} needle beyond a window "
            f"of {spec.window} tokens"
        )
    return Probe(
        spec=spec,
        seed=seed,
        needle=needle,
        question=torch.tensor([QUERY_ID, *encode(question)], dtype=torch.int64),
        answer=answer,
        distractor_digits=digits,
        hay_bytes=hay,
        needle_at=rng.randint(0, latest),
    )
