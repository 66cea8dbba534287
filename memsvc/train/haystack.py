"""Haystack text for the recall tasks: repeated, random-word, random-sentence and real text.

Two sentence generators with disjoint words and templates: TRAIN_VOCAB for
training and HELDOUT_VOCAB, never trained on, for evaluation (docs/TRAINING.md,
"What is written decides what is recalled": a model that learned one filler must be
tested on another). Distractor sentences carry random numbers shaped like the
answers, so "remember every digit" is not a shortcut.

Real-text haystacks (`real:<kind>`, e.g. `real:chinese`) are lines of the corpus
(memsvc/corpus): its training split with the training vocabulary, its held-out
split with the held-out one.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from memsvc.corpus import KINDS as REAL_KINDS

Haystack = str  # one of SYNTHETIC_HAYSTACKS, or "real:<kind>" with a corpus kind
SYNTHETIC_HAYSTACKS = ("repeated", "words", "sentences")
REAL_HAYSTACKS = tuple(f"real:{kind}" for kind in REAL_KINDS)
HAYSTACKS: tuple[Haystack, ...] = SYNTHETIC_HAYSTACKS + REAL_HAYSTACKS

# RULER's noise filler.
REPEATED = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def _phrases(text: str) -> tuple[str, ...]:
    return tuple(" ".join(p.split()) for p in text.split(";") if p.strip())


@dataclass(frozen=True)
class Vocabulary:
    """Words and templates of one sentence generator. Templates use {subject},
    {subject2}, {verb}, {object}, {adjective}, {place}; distractors also {number}."""

    name: str
    subjects: tuple[str, ...]
    verbs: tuple[str, ...]  # past tense, transitive
    objects: tuple[str, ...]
    adjectives: tuple[str, ...]
    places: tuple[str, ...]  # prepositional phrases
    templates: tuple[str, ...]
    distractors: tuple[str, ...]

    def content_words(self) -> frozenset[str]:
        """Every word of the word lists (places without their prepositions and articles)."""
        places = {p.split()[-1] for p in self.places}
        return frozenset({*self.subjects, *self.verbs, *self.objects, *self.adjectives, *places})

    def fill(self, rng: random.Random, template: str, **extra: str) -> str:
        subject, subject2 = rng.sample(self.subjects, 2)
        text = template.format(
            subject=subject,
            subject2=subject2,
            verb=rng.choice(self.verbs),
            object=rng.choice(self.objects),
            adjective=rng.choice(self.adjectives),
            place=rng.choice(self.places),
            **extra,
        )
        return text[0].upper() + text[1:]

    def sentence(self, rng: random.Random) -> str:
        return self.fill(rng, rng.choice(self.templates))

    def distractor(self, rng: random.Random, digits: int) -> str:
        number = str(rng.randrange(10 ** (digits - 1), 10**digits))
        return self.fill(rng, rng.choice(self.distractors), number=number)

    def word(self, rng: random.Random) -> str:
        return rng.choice(rng.choice((self.subjects, self.verbs, self.objects, self.adjectives)))


TRAIN_VOCAB = Vocabulary(
    name="train",
    subjects=_words(
        """
        farmer teacher pilot baker doctor sailor painter student soldier merchant gardener
        nurse driver writer singer hunter miner judge priest dancer fisherman carpenter
        tailor librarian chef scientist engineer clerk poet shepherd captain widow king
        queen child boy girl monk knight traveler
        """
    ),
    verbs=_words(
        """
        carried painted found lost sold bought cleaned opened closed repaired dropped lifted
        hid borrowed returned admired ignored counted washed broke moved packed stole
        polished examined wrapped dragged pushed pulled buried noticed weighed guarded
        shared mended chose measured collected delivered tossed
        """
    ),
    objects=_words(
        """
        basket lantern table letter map hammer coat bottle box book chair drum rope ladder
        bucket candle kettle mirror blanket wagon saddle bell cup plate knife spoon shovel
        barrel violin clock ring scarf umbrella boot pillow jar compass fence boat helmet
        """
    ),
    adjectives=_words(
        """
        old new heavy small large broken shiny wooden red blue green dusty quiet strange
        golden tiny long round empty bright dark warm cold soft
        """
    ),
    places=_phrases(
        """
        near the river; in the kitchen; at the market; behind the barn; on the hill;
        in the garden; by the harbor; under the bridge; in the village; at the station;
        inside the church; along the road; in the forest; at the school; on the farm;
        beside the well; in the castle; at the mill; on the beach; in the attic;
        near the lake; in the square; at the inn; by the gate;
        """
    ),
    templates=(
        "the {subject} {verb} the {object} {place}.",
        "yesterday the {subject} {verb} a {adjective} {object}.",
        "{place}, the {subject} {verb} the {object}.",
        "the {subject} and the {subject2} {verb} the {object} together.",
        "nobody knew why the {subject} {verb} the {adjective} {object}.",
        "after dinner the {subject} {verb} the {object} {place}.",
        "the {subject} said that the {object} was {adjective}.",
        "it was the {subject} who {verb} the {object}.",
        "{place}, a {adjective} {object} waited for the {subject}.",
        "the {subject} never {verb} the {object} again.",
        "one morning the {subject} {verb} the {adjective} {object} {place}.",
    ),
    distractors=(
        "the {subject} wrote the number {number} on the {object}.",
        "room {number} was booked by the {subject}.",
        "the {object} cost {number} coins {place}.",
        "the {subject} counted {number} birds {place}.",
        "order {number} was sent to the {subject}.",
    ),
)

HELDOUT_VOCAB = Vocabulary(
    name="heldout",
    subjects=_words(
        """
        astronaut plumber lawyer architect banker jeweler florist mechanic surgeon dentist
        grocer barber cashier referee waiter janitor courier editor professor violinist
        acrobat detective magician archer potter weaver butcher mayor senator nephew
        grandmother toddler cowboy pirate wizard inventor diplomat photographer journalist
        athlete
        """
    ),
    verbs=_words(
        """
        inspected decorated launched ordered rescued folded sketched scanned printed
        adjusted sorted labeled rented tested stacked shipped unlocked sealed traded grabbed
        rinsed ironed loaded emptied filled photographed recorded assembled sharpened tuned
        dusted signed stamped hauled juggled rolled kicked squeezed zipped flipped
        """
    ),
    objects=_words(
        """
        laptop suitcase telescope bicycle guitar microscope helicopter sandwich envelope
        calculator skateboard trumpet backpack notebook printer stapler thermos tripod sofa
        carpet radio camera puzzle kite tractor trophy wallet necklace rocket canoe
        sculpture magnet balloon toaster jacket tent vase piano globe ticket
        """
    ),
    adjectives=_words(
        """
        purple enormous fragile plastic modern noisy sticky elegant rusty spotless orange
        gigantic narrow ancient silver striped clumsy fancy glossy crooked frozen fuzzy
        hollow tidy
        """
    ),
    places=_phrases(
        """
        at the airport; in the laboratory; at the stadium; in the office; at the museum;
        on the rooftop; in the garage; at the hotel; in the subway; at the pharmacy;
        on the balcony; in the warehouse; at the bakery; in the library; at the zoo;
        in the theater; at the clinic; on the highway; in the basement; at the casino;
        in the elevator; at the circus; on the pier; in the lobby;
        """
    ),
    templates=(
        "apparently the {subject} {verb} the {object} {place}.",
        "why would the {subject} have {verb} that {adjective} {object}?",
        "according to the {subject}, the {object} {place} looked {adjective}.",
        "somebody {verb} the {object} while the {subject} slept.",
        "{place}, the {subject} proudly {verb} a {adjective} {object}.",
        "meanwhile the {subject} {verb} the {object} twice.",
        "the {adjective} {object} belonged to a {subject} {place}.",
        "honestly, the {subject} {verb} every {object} {place}.",
    ),
    distractors=(
        "ticket number {number} belonged to the {subject}.",
        "the {subject} dialed {number} {place}.",
        "invoice {number} listed one {adjective} {object}.",
        "locker {number} held a {object} for the {subject2}.",
    ),
)

VOCABULARIES = {"train": TRAIN_VOCAB, "heldout": HELDOUT_VOCAB}


def check_haystack(kind: Haystack) -> None:
    if kind not in HAYSTACKS:
        raise ValueError(f"unknown haystack {kind!r} (one of {', '.join(HAYSTACKS)})")


def filler(
    rng: random.Random,
    kind: Haystack,
    vocab: Vocabulary,
    distractor_rate: float = 0.0,
    digits: int = 5,
) -> Iterator[str]:
    """Haystack units, forever: sentences (or words) ending with a space, or lines of real
    text ending with a newline; with probability `distractor_rate` a unit is a distractor
    sentence instead."""
    check_haystack(kind)
    repeated = [s.strip() + "." for s in REPEATED.split(".") if s.strip()]
    lines: Iterator[str] | None = None
    i = 0
    while True:
        if distractor_rate and rng.random() < distractor_rate:
            yield vocab.distractor(rng, digits) + " "
        elif kind == "repeated":
            yield repeated[i % len(repeated)] + " "
        elif kind == "words":
            yield vocab.word(rng) + " "
        elif kind == "sentences":
            yield vocab.sentence(rng) + " "
        else:
            if lines is None:
                from memsvc.corpus import open_corpus

                split = "train" if vocab.name == "train" else "eval"
                lines = open_corpus().stream(kind.removeprefix("real:"), split, rng)
            yield next(lines)
        i += 1


def haystack_units(
    rng: random.Random,
    kind: Haystack,
    vocab: Vocabulary,
    n_bytes: int,
    distractor_rate: float = 0.0,
    digits: int = 5,
) -> list[str]:
    """Units of `filler` (module docstring), at least n_bytes UTF-8 bytes in all."""
    units: list[str] = []
    total = 0
    stream = filler(rng, kind, vocab, distractor_rate, digits)
    while total < n_bytes:  # no draw beyond the last unit: the caller's rng goes on from here
        units.append(next(stream))
        total += len(units[-1].encode())
    return units
