"""Synthetic long-context tasks (RULER-style), generated on the fly from a seed.

Every sample has exactly `spec.length` tokens:

    BOS context (QUERY question answer)* [EOS]

- passkey: "The pass key is 12345. Remember it." hidden in a haystack.
- number / uuid: "The magic number for lantern is 4821937." (RULER's niah value kinds).
- mqar: multi-query associative recall: key=value pairs, then several queries.
- text: plain next-byte text (no question).
- facts: keyed facts, some revised, each asked by its key (facts.py).

Haystacks: repeated sentences, random words, random sentences, from the
training vocabulary or the held-out one (haystack.py), with optional
distractor sentences carrying numbers shaped like the answer. The needle goes
at a sentence boundary at a chosen or random depth, and can be required
inside or outside the attention window of the answer.

Positions: token i of `Sample.tokens`; the model's logits at i - 1 predict token i.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from memsvc.model.tokenizer import BOS_ID, EOS_ID, PAD_ID, QUERY_ID, encode
from memsvc.train.haystack import VOCABULARIES, Haystack, check_haystack, haystack_units
from memsvc.train.phrasing import PHRASINGS, VALUE_KINDS, ValueKind

TaskKind = Literal["passkey", "number", "uuid", "mqar", "text", "facts"]
NeedlePlacement = Literal["any", "in_window", "out_of_window"]
NEEDLE_KINDS: tuple[TaskKind, ...] = ("passkey", "number", "uuid")


@dataclass(frozen=True)
class TaskSpec:
    """What one sample looks like."""

    kind: TaskKind
    length: int  # tokens per sample, exactly
    haystack: Haystack = "sentences"
    vocabulary: Literal["train", "heldout"] = "train"
    distractor_rate: float = 0.0  # chance that a haystack unit is a distractor sentence
    # Needle tasks: "in_window": every answer position sees the whole needle within the
    # attention window W; "out_of_window": none sees any of it.
    needle: NeedlePlacement = "any"
    window: int = 128
    depth: float | None = None  # needle start / context length; None: random
    n_queries: int = 4  # mqar
    max_facts: int = 4  # facts: 1..max_facts per sample
    value_kinds: tuple[ValueKind, ...] = VALUE_KINDS  # facts
    phrasing: str | None = None  # facts: a phrasing.PHRASINGS name (None: the vocabulary's)

    def __post_init__(self) -> None:
        check_haystack(self.haystack)
        if self.phrasing is not None and self.phrasing not in PHRASINGS:
            raise ValueError(f"unknown phrasing {self.phrasing!r} ({', '.join(PHRASINGS)})")
        if self.depth is not None and not 0.0 <= self.depth <= 1.0:
            raise ValueError("depth must be in [0, 1]")
        if not 0.0 <= self.distractor_rate <= 1.0:
            raise ValueError("distractor_rate must be in [0, 1]")
        if self.kind == "mqar" and self.n_queries < 1:
            raise ValueError("mqar needs n_queries >= 1")


@dataclass(frozen=True)
class Sample:
    """One sequence with the spans the loss and the evaluation need ([start, end) tokens)."""

    tokens: Tensor  # (L,) int64
    answers: tuple[tuple[int, int], ...]  # answer bytes, one span per question
    questions: tuple[tuple[int, int], ...]  # QUERY + the question prompt, before each answer
    answer_texts: tuple[str, ...]
    needle: tuple[int, int] | None  # the needle sentence (needle tasks)
    # Keyed facts: where each byte of each fact's latest value is written (the position
    # before it, whose memory query is the key the byte is stored under) and, per answer
    # byte, the position that reads it (before the byte) with its write's index.
    fact_writes: tuple[int, ...] = ()
    fact_reads: tuple[tuple[int, int], ...] = ()

    def mask(self, spans: Sequence[tuple[int, int]]) -> Tensor:
        out = torch.zeros(len(self.tokens), dtype=torch.bool)
        for start, end in spans:
            out[start:end] = True
        return out


@dataclass(frozen=True)
class Batch:
    """Samples padded to one length and shifted for next-token prediction."""

    inputs: Tensor  # (B, L-1) int64 tokens[:, :-1]
    targets: Tensor  # (B, L-1) int64 tokens[:, 1:], PAD after a sample's end
    answer_mask: Tensor  # (B, L-1) bool: the target is an answer byte
    text_mask: Tensor  # (B, L-1) bool: the target is a real token (next-byte loss)
    # Keyed facts (Sample.fact_writes / fact_reads), as input positions: rows (sample,
    # position) of every value byte's write, and rows (sample, position, write row) per
    # answer byte.
    fact_writes: Tensor  # (n_w, 2) int64
    fact_reads: Tensor  # (n_r, 3) int64


def generate(spec: TaskSpec, rng: random.Random) -> Sample:
    """One sample of `spec`, drawing all randomness from `rng`."""
    if spec.kind in NEEDLE_KINDS:
        return _needle_sample(spec, rng)
    if spec.kind == "mqar":
        return _mqar_sample(spec, rng)
    if spec.kind == "text":
        return _text_sample(spec, rng)
    if spec.kind == "facts":
        from memsvc.train.facts import fact_sample

        return fact_sample(
            rng,
            spec.length,
            max_facts=spec.max_facts,
            value_kinds=spec.value_kinds,
            haystack=spec.haystack,
            vocabulary=spec.vocabulary,
            distractor_rate=spec.distractor_rate,
            window=spec.window,
            out_of_window=spec.needle == "out_of_window",
            phrasing=spec.phrasing,
        )
    raise ValueError(f"unknown task kind {spec.kind!r}")


def sample(spec: TaskSpec, seed: int) -> Sample:
    """The sample of `spec` for `seed` (the same on every machine)."""
    return generate(spec, random.Random(seed))


def collate(samples: Sequence[Sample]) -> Batch:
    length = max(len(s.tokens) for s in samples)
    tokens = torch.full((len(samples), length), PAD_ID, dtype=torch.int64)
    answer = torch.zeros(len(samples), length, dtype=torch.bool)
    writes: list[tuple[int, int]] = []
    reads: list[tuple[int, int, int]] = []
    for i, s in enumerate(samples):
        tokens[i, : len(s.tokens)] = s.tokens
        answer[i, : len(s.tokens)] = s.mask(s.answers)
        first = len(writes)
        writes += [(i, position) for position in s.fact_writes]
        reads += [(i, position, first + fact) for position, fact in s.fact_reads]
    return Batch(
        inputs=tokens[:, :-1],
        targets=tokens[:, 1:],
        answer_mask=answer[:, 1:],
        text_mask=tokens[:, 1:] != PAD_ID,
        fact_writes=torch.tensor(writes, dtype=torch.int64).view(-1, 2),
        fact_reads=torch.tensor(reads, dtype=torch.int64).view(-1, 3),
    )


# ---- needle tasks ------------------------------------------------------------------------


def needle_parts(kind: TaskKind, rng: random.Random, vocab_name: str) -> tuple[str, str, str, int]:
    """(needle sentence, question prompt, answer, distractor digits) of a needle task."""
    if kind == "passkey":
        key = str(rng.randrange(10_000, 100_000))
        return (
            f"The pass key is {key}. Remember it. ",
            "What is the pass key? The pass key is ",
            key,
            5,
        )
    word = rng.choice(VOCABULARIES[vocab_name].objects)
    if kind == "number":
        value = str(rng.randrange(1_000_000, 10_000_000))
    else:
        value = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    noun = "number" if kind == "number" else "uuid"
    return (
        f"The magic {noun} for {word} is {value}. ",
        f"What is the magic {noun} for {word}? The magic {noun} for {word} is ",
        value,
        7,
    )


def _needle_sample(spec: TaskSpec, rng: random.Random) -> Sample:
    needle, question, answer, digits = needle_parts(spec.kind, rng, spec.vocabulary)
    n_needle, n_question = len(encode(needle)), 1 + len(encode(question))  # + QUERY
    n_hay = spec.length - 2 - n_needle - n_question - len(encode(answer))  # - BOS, EOS
    if n_hay < 0:
        raise ValueError(f"length {spec.length} is too short for a {spec.kind} sample")
    units = haystack_units(
        rng,
        spec.haystack,
        VOCABULARIES[spec.vocabulary],
        n_hay,
        spec.distractor_rate,
        digits,
    )
    hay = fit_bytes(units, n_hay)
    at = _needle_position(spec, rng, hay, unit_starts(units), n_needle, n_question)
    context = hay[:at] + needle.encode() + hay[at:]

    tokens = [BOS_ID, *context]
    q_start = len(tokens)
    tokens += [QUERY_ID, *encode(question)]
    a_start = len(tokens)
    tokens += [*encode(answer), EOS_ID]
    return Sample(
        tokens=torch.tensor(tokens, dtype=torch.int64),
        answers=((a_start, a_start + len(answer)),),
        questions=((q_start, a_start),),
        answer_texts=(answer,),
        needle=(1 + at, 1 + at + n_needle),
    )


def fit_bytes(units: list[str], n: int) -> bytes:
    """The units' UTF-8 bytes cut to `n` at a character boundary, padded with spaces to `n`."""
    data = "".join(units).encode()[:n].decode("utf-8", errors="ignore").encode()
    return data + b" " * (n - len(data))


def unit_starts(units: list[str]) -> list[int]:
    """The byte offset where each unit starts."""
    starts, offset = [], 0
    for unit in units:
        starts.append(offset)
        offset += len(unit.encode())
    return starts


def snap(hay: bytes, target: int, lo: int, hi: int, unit_starts: list[int]) -> int:
    """A byte offset in [lo, hi] near `target`: the nearest unit start, else the nearest word
    start, else `target` moved to a character boundary."""
    word_starts = [0] + [i + 1 for i, byte in enumerate(hay) if byte in (0x20, 0x0A)]
    for candidates in (unit_starts, word_starts):
        inside = [p for p in candidates if lo <= p <= hi]
        if inside:
            return min(inside, key=lambda p: (abs(p - target), p))
    while target < len(hay) and hay[target] & 0xC0 == 0x80:  # inside a UTF-8 sequence
        target += 1
    return target


def _needle_position(
    spec: TaskSpec,
    rng: random.Random,
    hay: bytes,
    starts: list[int],
    n_needle: int,
    n_question: int,
) -> int:
    """Byte offset in the haystack where the needle goes.

    With the needle at offset p, the answer starts n_hay - p + n_needle + n_question
    tokens after the needle's start; that distance decides what the window covers.
    """
    n_hay = len(hay)
    lo, hi = 0, n_hay
    if spec.needle == "in_window":  # answer start - needle start <= W
        lo = n_hay + n_needle + n_question - spec.window
        if lo > hi:
            raise ValueError(f"a {spec.kind} needle and question do not fit in the window")
        lo = max(lo, 0)
    elif spec.needle == "out_of_window":  # answer start - needle end > W
        hi = n_hay + n_question - spec.window - 1
        if hi < 0:
            raise ValueError(f"length {spec.length} is too short for an out-of-window needle")
    if spec.depth is None:
        target = rng.randint(lo, hi)
    else:
        target = round(spec.depth * n_hay)
        if not lo <= target <= hi:
            raise ValueError(f"depth {spec.depth} contradicts needle placement {spec.needle!r}")

    return snap(hay, target, lo, hi, starts)


# ---- multi-query associative recall and plain text ---------------------------------------


def _mqar_sample(spec: TaskSpec, rng: random.Random) -> Sample:
    """BOS "abcd=1234 " pairs ... then per query: QUERY "abcd=" answer "1234"; EOS."""
    pair_len, query_len = 10, 10  # "abcd=1234 " and QUERY + "abcd=" + "1234"
    region = spec.length - 2 - spec.n_queries * query_len
    n_pairs = region // pair_len
    if n_pairs < spec.n_queries:
        raise ValueError(f"length {spec.length} holds fewer pairs than queries")
    keys: dict[str, str] = {}
    while len(keys) < n_pairs:
        key = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=4))
        keys.setdefault(key, str(rng.randrange(1000, 10_000)))
    context = "".join(f"{k}={v} " for k, v in keys.items()) + " " * (region - n_pairs * pair_len)

    tokens = encode(context, bos=True)
    questions, answers, texts = [], [], []
    for key in rng.sample(list(keys), spec.n_queries):
        q_start = len(tokens)
        tokens += [QUERY_ID, *encode(f"{key}=")]
        a_start = len(tokens)
        tokens += encode(keys[key])
        questions.append((q_start, a_start))
        answers.append((a_start, len(tokens)))
        texts.append(keys[key])
    tokens.append(EOS_ID)
    return Sample(
        tokens=torch.tensor(tokens, dtype=torch.int64),
        answers=tuple(answers),
        questions=tuple(questions),
        answer_texts=tuple(texts),
        needle=None,
    )


def _text_sample(spec: TaskSpec, rng: random.Random) -> Sample:
    vocab = VOCABULARIES[spec.vocabulary]
    n = spec.length - 1
    units = haystack_units(rng, spec.haystack, vocab, n, spec.distractor_rate)
    tokens = [BOS_ID, *fit_bytes(units, n)]
    return Sample(torch.tensor(tokens, dtype=torch.int64), (), (), (), None)


# ---- curriculum --------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One phase of training: every batch mixes the listed kinds and haystacks uniformly."""

    name: str
    length: int
    needle: NeedlePlacement
    steps: int
    batch_size: int
    kinds: tuple[TaskKind, ...] = ("passkey",)
    haystacks: tuple[Haystack, ...] = ("repeated", "sentences")
    distractor_rate: float = 0.0
    max_facts: int = 4
    value_kinds: tuple[ValueKind, ...] = VALUE_KINDS  # facts
    phrasing: str | None = None  # facts (TaskSpec.phrasing)

    def specs(self, window: int) -> list[TaskSpec]:
        return [
            TaskSpec(
                kind=kind,
                length=self.length,
                haystack=haystack,
                distractor_rate=self.distractor_rate,
                needle=self.needle if kind in (*NEEDLE_KINDS, "facts") else "any",
                window=window,
                max_facts=self.max_facts,
                value_kinds=self.value_kinds,
                phrasing=self.phrasing,
            )
            for kind in self.kinds
            for haystack in self.haystacks
        ]

    def batch(self, window: int, seed: int) -> Batch:
        """The stage's batch for `seed` (samples drawn from one seeded generator)."""
        rng = random.Random(seed)
        specs = self.specs(window)
        return collate([generate(rng.choice(specs), rng) for _ in range(self.batch_size)])


def reference_curriculum(window: int = 128, tokens_per_step: int = 8192) -> tuple[Stage, ...]:
    """The recipe that learned recall in docs/TRAINING.md: an in-window warm-up first
    (the copy circuit forms there), then needles beyond the window at growing lengths,
    then varied haystacks with distractors so "write every digit" stops paying."""

    def stage(name: str, length: int, needle: NeedlePlacement, steps: int, **kw) -> Stage:
        batch_size = max(1, tokens_per_step // length)
        return Stage(name, length, needle, steps, batch_size, **kw)

    varied = {"kinds": ("passkey", "number", "mqar"), "haystacks": ("words", "sentences")}
    return (
        stage("warmup-in-window", 2 * window, "in_window", 100),
        stage("beyond-window-512", 512, "out_of_window", 200),
        stage("beyond-window-2k", 2048, "out_of_window", 200),
        stage("beyond-window-4k", 4096, "out_of_window", 200),
        stage("varied-1k", 1024, "any", 200, distractor_rate=0.2, **varied),
        stage("varied-4k", 4096, "any", 200, distractor_rate=0.2, **varied),
        stage("varied-8k", 8192, "any", 200, distractor_rate=0.2, **varied),
    )


def long_context_curriculum(window: int = 128, tokens_per_step: int = 32768) -> tuple[Stage, ...]:
    """Fine-tuning for recall far beyond the window, from a model that finished the
    reference curriculum: needles at growing distances in varied haystacks with
    distractor numbers, so the memory learns to keep the needle through long filler
    instead of overwriting it."""
    varied = {"kinds": ("passkey", "number"), "haystacks": ("words", "sentences")}

    def stage(name: str, length: int, steps: int) -> Stage:
        batch_size = max(1, tokens_per_step // length)
        placement: NeedlePlacement = "out_of_window"
        return Stage(name, length, placement, steps, batch_size, distractor_rate=0.1, **varied)

    return (
        stage("long-8k", 8192, 40),
        stage("long-16k", 16384, 80),
        stage("long-32k", 32768, 120),
    )


REAL_AND_SYNTHETIC: tuple[Haystack, ...] = (
    "sentences",
    "words",
    "real:english",
    "real:chinese",
    "real:german",
    "real:japanese",
    "real:code",
    "real:json",
    "real:logs",
)


def recall_curriculum(window: int = 128, tokens_per_step: int = 8192) -> tuple[Stage, ...]:
    """Keyed facts and needles in real-text and synthetic haystacks, one curriculum for
    both (from a model whose backbone already copies in-window: `init_backbone_from`).

    Every stage mixes real text of every corpus kind (training split) with synthetic
    sentences, so next-byte loss and recall are learned on what agents stream; facts
    get double weight, their number grows with the length, and 20% of haystack units
    are distractor sentences carrying numbers from 2k on."""

    def stage(name: str, length: int, needle: NeedlePlacement, steps: int, **kw) -> Stage:
        batch_size = max(1, tokens_per_step // length)
        return Stage(name, length, needle, steps, batch_size, haystacks=REAL_AND_SYNTHETIC, **kw)

    return (
        stage("warmup-in-window", 2 * window, "in_window", 80, kinds=("passkey", "facts"),
              max_facts=1),
        stage("beyond-window-512", 512, "out_of_window", 150,
              kinds=("passkey", "number", "facts", "facts"), max_facts=2),
        stage("facts-2k", 2048, "out_of_window", 250, distractor_rate=0.2,
              kinds=("passkey", "uuid", "facts", "facts", "text"), max_facts=4),
        stage("facts-4k", 4096, "out_of_window", 300, distractor_rate=0.2,
              kinds=("passkey", "number", "facts", "facts", "text"), max_facts=8),
        stage("facts-8k", 8192, "out_of_window", 250, distractor_rate=0.2,
              kinds=("passkey", "facts", "facts"), max_facts=16),
        stage("facts-16k", 16384, "out_of_window", 150, distractor_rate=0.2,
              kinds=("passkey", "facts", "facts"), max_facts=16),
    )  # fmt: skip


def facts_curriculum(window: int = 128, tokens_per_step: int = 8192) -> tuple[Stage, ...]:
    """Fine-tuning for keyed facts, from a model that already recalls one needle
    (`init_from`). The recall curriculum mixed facts into every stage from the start
    and its models answered every question with the same salient number (even on the
    training generator: 1 fact at 1k 38%, 4 facts 3%). Here facts come first and alone:
    inside the window, where attention learns to look a key up and copy its value;
    then just beyond it with two, then four facts of short values, so the memory must
    tell the keys apart before the values grow long and the streams long. Passkeys and
    real text stay in the mix so what the model could do is kept."""

    def stage(name: str, length: int, needle: NeedlePlacement, steps: int, **kw) -> Stage:
        batch_size = max(1, tokens_per_step // length)
        return Stage(name, length, needle, steps, batch_size, haystacks=REAL_AND_SYNTHETIC, **kw)

    short: tuple[ValueKind, ...] = ("digits", "words")
    return (
        stage("facts-in-window", 2 * window, "any", 80, kinds=("facts",), max_facts=2,
              value_kinds=short),
        stage("facts-512", 512, "out_of_window", 150, kinds=("facts",), max_facts=2,
              value_kinds=short),
        stage("facts-1k", 1024, "out_of_window", 200, kinds=("facts", "facts", "passkey"),
              max_facts=4, value_kinds=short, distractor_rate=0.2),
        stage("facts-2k", 2048, "out_of_window", 200, kinds=("facts", "facts", "passkey"),
              max_facts=8, distractor_rate=0.2),
        stage("facts-4k", 4096, "out_of_window", 150, kinds=("facts", "facts", "passkey"),
              max_facts=8, distractor_rate=0.2),
    )  # fmt: skip


def _long_stage(
    name: str, length: int, steps: int, tokens_per_step: int, kinds: tuple[TaskKind, ...]
) -> Stage:
    """A stage of the long fine-tunings: needles beyond the window of `length` tokens in
    real-text and synthetic haystacks, 10% distractors, `tokens_per_step` per step."""
    return Stage(
        name,
        length,
        "out_of_window",
        steps,
        max(1, tokens_per_step // length),
        distractor_rate=0.1,
        kinds=kinds,
        haystacks=REAL_AND_SYNTHETIC,
        max_facts=8,
    )


def long_mixed_curriculum(window: int = 128, tokens_per_step: int = 32768) -> tuple[Stage, ...]:
    """The long-context fine-tuning (`long_context_curriculum`) in real-text and
    synthetic haystacks, with keyed facts beside the needles: for a model from the
    recall or facts curricula, whose stages stop at 16k and whose passkey fell away
    beyond 64k while a model with this long stage held to 1M."""
    kinds: tuple[TaskKind, ...] = ("passkey", "number", "facts")
    return tuple(
        _long_stage(name, length, steps, tokens_per_step, kinds)
        for name, length, steps in (("long-8k", 8192, 40), ("long-16k", 16384, 60),
                                    ("long-32k", 32768, 80))
    )  # fmt: skip


def long_128k_curriculum(window: int = 128, tokens_per_step: int = 65536) -> tuple[Stage, ...]:
    """The long stage carried past 32k, for a model from `long-mixed`: pass keys and numbers
    at 32k, 64k and 128k in real-text and synthetic haystacks. The shipped default, whose
    stages stop at 32k, holds the pass key to 64k in most real kinds and loses it at 256k
    (docs/TRAINING.md). A 128k sequence is one sample per step."""
    kinds: tuple[TaskKind, ...] = ("passkey", "number")
    return tuple(
        _long_stage(name, length, steps, tokens_per_step, kinds)
        for name, length, steps in (("long-32k", 32768, 20), ("long-64k", 65536, 40),
                                    ("long-128k", 131072, 30))
    )  # fmt: skip
