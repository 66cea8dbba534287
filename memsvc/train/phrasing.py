"""The words of the keyed-fact tasks: keys, attributes, values and the sentences that state,
revise and ask a fact. Two disjoint generators: TRAIN_PHRASING for training and
HELDOUT_PHRASING for evaluation (other names, other attributes, other templates), so a
model is judged on phrasings it never saw.

Templates use {key}, {Key} (sentence-initial), {keys} / {Keys} (possessive), {attr} and
{value}.
"""

from __future__ import annotations

import random
import string
import uuid
from dataclasses import dataclass
from typing import Literal

ValueKind = Literal["digits", "words", "code", "uuid"]
VALUE_KINDS: tuple[ValueKind, ...] = ("digits", "words", "code", "uuid")


def _list(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def _phrases(text: str) -> tuple[str, ...]:
    return tuple(" ".join(p.split()) for p in text.split(";") if p.strip())


@dataclass(frozen=True)
class Phrasing:
    name: str
    names: tuple[str, ...]  # people
    projects: tuple[str, ...]  # codenames: "project {x}"
    places: tuple[str, ...]  # "the {x}"
    attributes: dict[ValueKind, tuple[str, ...]]
    statements: tuple[str, ...]
    revisions: tuple[str, ...]
    questions: tuple[str, ...]
    leads: tuple[str, ...]  # what follows the question, right before the answer
    syllables: tuple[str, ...]  # word values are made of these

    def key(self, rng: random.Random) -> str:
        pick = rng.random()
        if pick < 0.5:
            return rng.choice(self.names)
        if pick < 0.75:
            return f"project {rng.choice(self.projects)}"
        return f"the {rng.choice(self.places)}"

    def value(self, kind: ValueKind, rng: random.Random) -> str:
        if kind == "digits":
            n = rng.randint(5, 10)
            return str(rng.randint(1, 9)) + "".join(rng.choices(string.digits, k=n - 1))
        if kind == "words":
            return "".join(rng.choices(self.syllables, k=rng.randint(2, 4)))
        if kind == "code":
            n = rng.randint(6, 12)
            chars = rng.choices(string.ascii_uppercase + string.digits, k=n)
            digit, letter = rng.sample(range(n), 2)  # always letters and digits
            chars[digit] = rng.choice(string.digits)
            chars[letter] = rng.choice(string.ascii_uppercase)
            return "".join(chars)
        if kind == "uuid":
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        raise ValueError(f"unknown value kind {kind!r}")

    def render(self, template: str, key: str, attr: str, value: str = "") -> str:
        keys = f"{key}'" if key.endswith("s") else f"{key}'s"
        text = template.format(
            key=key, Key=_cap(key), keys=keys, Keys=_cap(keys), attr=attr, value=value
        )
        return _cap(text)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


TRAIN_PHRASING = Phrasing(
    name="train",
    names=_list(
        """
        Maria Ahmed Chen Olga Pedro Yuki Fatima Lars Priya Tomas Ines Kofi Mei Ivan Sofia
        Raj Elena Omar Hana Lucas Amara Jonas Nadia Felix Leila Diego Anya Samuel Zara Victor
        Greta Malik Rosa Henrik Aisha Bruno Clara Dmitri Esther Hugo
        """
    ),
    projects=_list(
        """
        Falcon Orchid Granite Comet Willow Harbor Sapphire Thunder Maple Quartz Beacon Ember
        Glacier Horizon Juniper Lantern Meadow Nimbus Pioneer Summit
        """
    ),
    places=_phrases(
        """
        blue lab; north office; main warehouse; back garden; third floor; old garage;
        staff kitchen; server room; east wing; front desk; music room; rooftop bar
        """
    ),
    attributes={
        "digits": _phrases("PIN; phone extension; account number; badge number; locker number"),
        "words": _phrases("password; code word; nickname; secret word; favourite word"),
        "code": _phrases("access code; license key; serial; voucher code; ticket id"),
        "uuid": _phrases("uuid; device id; session id"),
    },
    statements=(
        "{keys} {attr} is {value}.",
        "the {attr} for {key} is {value}.",
        "for the record, {key} has the {attr} {value}.",
        "{Key}: {attr} = {value}.",
        "remember that {keys} {attr} is {value}.",
        "please note the {attr} of {key}: {value}.",
        "we set the {attr} of {key} to {value}.",
        "{Key} uses {value} as the {attr}.",
        "log entry: {attr} for {key} -> {value}.",
        "the new {attr} of {key} will be {value}.",
    ),
    revisions=(
        "update: {keys} {attr} is now {value}.",
        "correction - the {attr} for {key} changed to {value}.",
        "{Key} replaced the old {attr}; the new one is {value}.",
        "from now on the {attr} of {key} is {value}.",
    ),
    questions=(
        "What is {keys} {attr}?",
        "Tell me the {attr} for {key}.",
        "Do you remember the {attr} of {key}?",
        "{Key} - what was the {attr}?",
        "Which {attr} belongs to {key}?",
    ),
    leads=(
        "{Keys} {attr} is ",
        "The {attr} for {key} is ",
        "Answer: ",
        "It is ",
        "{attr}: ",
    ),
    syllables=_list("ka lo mi ne ru ta vo si pe da gu fi zo be ha ni xo la mu te"),
)

HELDOUT_PHRASING = Phrasing(
    name="heldout",
    names=_list(
        """
        Beatrix Oskar Ngozi Takeshi Marisol Bjorn Farida Emeka Svetlana Ravi Ingrid Kwame
        Lucia Haruto Zeynep Anders Chiara Tariq Ximena Dagny Ruben Yasmin Ignacio Keiko
        Florin Wanjiru Mateus Odile Parvati Stellan
        """
    ),
    projects=_list(
        """
        Aurora Basalt Cobalt Dune Estuary Fjord Gale Heron Indigo Jade Kestrel Lagoon Monsoon
        Nebula Obsidian
        """
    ),
    places=_phrases(
        """
        red studio; south annex; loading dock; pottery shed; basement archive; glass atrium;
        night shift desk; print shop; west tower; reading nook
        """
    ),
    attributes={
        "digits": _phrases("employee number; room code; customer number; safe combination"),
        "words": _phrases("passphrase; call sign; watchword; magic word"),
        "code": _phrases("activation code; tracking code; promo code; reference code"),
        "uuid": _phrases("instance id; trace id; record id"),
    },
    statements=(
        "quick note - {key} goes by the {attr} {value}.",
        "save this: {attr} ({key}) is {value}.",
        "{Key} was assigned {attr} {value} today.",
        "in case you forget, {keys} {attr} reads {value}.",
        "the system lists {value} as the {attr} belonging to {key}.",
        "{attr} of {key}, for later: {value}.",
    ),
    revisions=(
        "heads up, {keys} {attr} has been changed to {value}.",
        "as of today the {attr} of {key} is {value} instead.",
        "{Key} got a fresh {attr}: {value}.",
    ),
    questions=(
        "Could you look up {keys} {attr}?",
        "I need the {attr} that {key} uses.",
        "What {attr} did we note for {key}?",
    ),
    leads=(
        "Sure, it is ",
        "The answer is ",
        "{Key} -> ",
    ),
    syllables=_list("bra cu dei fo gri jan kel mor nup qui sol tav wex yor zun"),
)

PHRASINGS = {"train": TRAIN_PHRASING, "heldout": HELDOUT_PHRASING}
