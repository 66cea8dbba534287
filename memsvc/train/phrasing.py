"""The words of the keyed-fact tasks: keys, attributes, values and the sentences that state,
revise and ask a fact. Two disjoint generators: TRAIN_PHRASING for training and
HELDOUT_PHRASING for evaluation (other names, other attributes, other templates), so a
model is judged on phrasings it never saw.

Templates use {key}, {Key} (sentence-initial), {keys} / {Keys} (possessive), {attr} and
{value}. The training generator is the broader one: besides its word lists it makes up
names and codenames from syllables, and wraps statements in openers and closers, so a
model learns "the value stated for this key" rather than a few dozen keys and sentences.
Everything it can make is disjoint from the held-out generator's words and templates
(tests/train/test_facts.py enumerates it).
"""

from __future__ import annotations

import functools
import random
import re
import string
import uuid
from dataclasses import dataclass, replace
from typing import Literal

from memsvc.train.grammar import Grammar

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
    name_syllables: tuple[str, ...] = ()  # made-up names and codenames (half of them), if any
    openers: tuple[str, ...] = ("",)  # put before a statement or revision
    closers: tuple[str, ...] = ("",)  # put after one
    asks: tuple[str, ...] = ("",)  # put before a question
    asked_closers: tuple[str, ...] = ("",)  # put after a question, before its lead
    grammar: Grammar | None = None  # composed templates beside the fixed ones, if any

    def key(self, rng: random.Random) -> str:
        pick = rng.random()
        made_up = bool(self.name_syllables) and rng.random() < 0.5
        if pick < 0.5:
            return self.made_up_name(rng) if made_up else rng.choice(self.names)
        if pick < 0.75:
            name = self.made_up_name(rng) if made_up else rng.choice(self.projects)
            return f"project {name}"
        return f"the {rng.choice(self.places)}"

    def made_up_name(self, rng: random.Random) -> str:
        return "".join(rng.choices(self.name_syllables, k=rng.randint(2, 3))).capitalize()

    def statement(self, rng: random.Random, key: str, attr: str, value: str) -> str:
        if self._composed(rng):
            return self._wrapped(rng, self.grammar.statement(rng), key, attr, value)
        return self._wrapped(rng, rng.choice(self.statements), key, attr, value)

    def revision(self, rng: random.Random, key: str, attr: str, value: str) -> str:
        if self._composed(rng):
            return self._wrapped(rng, self.grammar.revision(rng), key, attr, value)
        return self._wrapped(rng, rng.choice(self.revisions), key, attr, value)

    def question(self, rng: random.Random, key: str, attr: str) -> str:
        composed = self._composed(rng)
        template = self.grammar.question(rng) if composed else rng.choice(self.questions)
        if len(self.asks) > 1:  # as with openers: a phrasing without them draws nothing
            ask = rng.choice(self.asks)
            if ask and ask.rstrip()[-1] in ",:":  # mid-sentence: the question goes on
                template = template.replace("{Key}", "{key}").replace("{Keys}", "{keys}")
                template = ask + template[:1].lower() + template[1:]
            elif ask:
                template = ask + template
            template += rng.choice(self.asked_closers)
        asked = self.render(template, key, attr)
        lead = self.grammar.lead(rng) if self._composed(rng) else rng.choice(self.leads)
        return asked + " " + self.render(lead, key, attr)

    def _composed(self, rng: random.Random) -> bool:
        """Whether this sentence comes from the grammar (a phrasing without one draws
        nothing, so its probes stay the ones measured before grammars existed)."""
        return self.grammar is not None and rng.random() < self.grammar.share

    def _wrapped(self, rng: random.Random, template: str, key: str, attr: str, value: str) -> str:
        # A phrasing without openers or closers draws nothing for them, so its probes stay
        # the ones measured before these existed.
        opener = rng.choice(self.openers) if len(self.openers) > 1 else self.openers[0]
        closer = rng.choice(self.closers) if len(self.closers) > 1 else self.closers[0]
        if opener:  # the key is no longer sentence-initial
            template = template.replace("{Key}", "{key}").replace("{Keys}", "{keys}")
        return self.render(opener + template, key, attr, value) + closer

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

    def statement_template(self, text: str) -> str | None:
        """The fixed template a statement or revision (as rendered, without its trailing
        space) was made from; None for a composed or wrapped one."""
        return _most_specific(self.statements + self.revisions, lambda p: p.fullmatch(text))

    def question_templates(self, text: str) -> tuple[str | None, str | None]:
        """(question template, lead template) of a question as asked (question, space,
        lead); None where a part was composed or wrapped."""
        question = _most_specific(
            self.questions, lambda p: re.match(p.pattern + " ", text, re.I | re.S)
        )
        lead = _most_specific(
            self.leads, lambda p: re.search(" " + p.pattern + r"\Z", text, re.I | re.S)
        )
        return question, lead

    def render(self, template: str, key: str, attr: str, value: str = "") -> str:
        keys = f"{key}'" if key.endswith("s") else f"{key}'s"
        text = template.format(
            key=key, Key=_cap(key), keys=keys, Keys=_cap(keys), attr=attr, value=value
        )
        return _cap(text)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _most_specific(templates: tuple[str, ...], matches) -> str | None:
    """Of the templates whose pattern `matches`, the one with the most literal text (a
    placeholder matches any text, so "{keys} {attr} is" also matches "the PIN for X is")."""
    found = [t for t in templates if matches(_pattern(t))]
    return max(found, key=lambda t: len(re.sub(r"\{\w+\}", "", t)), default=None)


@functools.cache
def _pattern(template: str) -> re.Pattern[str]:
    """A template as a regular expression: each placeholder any text, the rest literal, case
    aside (rendering capitalises the first letter)."""
    parts = re.split(r"(\{\w+\})", template)
    body = "".join(".+?" if part.startswith("{") else re.escape(part) for part in parts)
    return re.compile(body, re.I | re.S)


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
        "digits": _phrases(
            """PIN; phone extension; account number; badge number; locker number; order number;
            door code; member number; flight number; invoice number; bank pin; seat number;
            postcode; gate number; pager number; table number; parcel number; case number"""
        ),
        "words": _phrases(
            """password; code word; nickname; secret word; favourite word; pet name; alias;
            password hint; keyword; motto word; codename; handle; login word"""
        ),
        "code": _phrases(
            """access code; license key; serial; voucher code; ticket id; booking reference;
            coupon; api token; part number; batch code; gift code; product key;
            confirmation code; discount code"""
        ),
        "uuid": _phrases("uuid; device id; session id; user id; job id; request id; node id"),
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
        "{Key} told me the {attr} is {value}.",
        "the {attr} on file for {key}: {value}.",
        "I wrote down {value} as {keys} {attr}.",
        "{Key} chose {value} for the {attr}.",
        "the {attr} that {key} picked is {value}.",
        "record: key={key}, {attr}={value}.",
        "as agreed, {keys} {attr} stays {value}.",
        "{keys} {attr}? that one is {value}.",
        "{Key} | {attr} | {value}.",
        "don't lose it: {key} has {attr} {value}.",
    ),
    revisions=(
        "update: {keys} {attr} is now {value}.",
        "correction - the {attr} for {key} changed to {value}.",
        "{Key} replaced the old {attr}; the new one is {value}.",
        "from now on the {attr} of {key} is {value}.",
        "{Key} changed the {attr} to {value}.",
        "never mind the old one, {keys} {attr} is {value} now.",
        "the {attr} of {key} was reset to {value}.",
        "new value for {keys} {attr}: {value}.",
    ),
    questions=(
        "What is {keys} {attr}?",
        "Tell me the {attr} for {key}.",
        "Do you remember the {attr} of {key}?",
        "{Key} - what was the {attr}?",
        "Which {attr} belongs to {key}?",
        "And {keys} {attr}?",
        "Remind me of the {attr} for {key}.",
        "What's the {attr} of {key} again?",
        "Please give {keys} {attr}.",
        "{attr} for {key}?",
        "Can you recall the {attr} {key} has?",
        "Find the {attr} of {key}.",
        "What {attr} does {key} have?",
        "Where did I put {keys} {attr}?",
        "Need {keys} {attr}.",
        "Look up the {attr} for {key}, please.",
        "What did {key} set as the {attr}?",
        "Which {attr} did {key} choose?",
        "I forgot {keys} {attr}. What was it?",
        "Give me the {attr} on file for {key}.",
        "Recall {keys} {attr}.",
        "What was recorded as {keys} {attr}?",
        "{Keys} {attr}, what is it?",
        "lookup: {key} / {attr}",
        "Search the notes for {keys} {attr}.",
        "What is the current {attr} of {key}?",
        "Get {keys} {attr} for me.",
        "Is there a {attr} for {key}? What is it?",
        "query: {attr} of {key}",
        "Any idea what {keys} {attr} is?",
        "What do we have as {keys} {attr}?",
    ),
    leads=(
        "{Keys} {attr} is ",
        "The {attr} for {key} is ",
        "Answer: ",
        "It is ",
        "{attr}: ",
        "Here it is: ",
        "That is ",
        "{Key} has ",
        "The {attr} is ",
        "Of course. ",
        "",
        "Found it: ",
        "{Keys} {attr}: ",
        "{Key}'s is ",
        "It was ",
        "Yes, it is ",
        "The {attr} is currently ",
        "Sure: ",
        "{attr} = ",
        "I have ",
        "According to my notes, it is ",
        "{Key} uses ",
        "Result: ",
        "That would be ",
        "{Key}: ",
        "The value is ",
        "We noted ",
        "OK, ",
        "It's ",
    ),
    syllables=_list("ka lo mi ne ru ta vo si pe da gu fi zo be ha ni xo la mu te"),
    name_syllables=_list(
        "al ben cor dri el fen gor hal im jor kas lin mar nor pav ril sen tor ul ves"
    ),
    openers=("", "", "", "note: ", "ok, ", "also, ", "btw, ", "important: ", "FYI ", "so, "),
    closers=("", "", "", " thanks.", " keep it safe.", " (noted)", " ok?", " got it."),
    asks=(
        "",
        "",
        "",
        "hey, ",
        "quick question: ",
        "one more thing. ",
        "sorry, ",
        "hi! ",
        "so, ",
        "ok. ",
        "next: ",
        "question: ",
        "hmm, ",
        "listen, ",
        "remind me: ",
    ),
    asked_closers=("", "", "", " Thanks.", " Quickly please.", " I need it now.", " (asap)"),
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

# The training phrasing with composed sentences beside its fixed ones (grammar.py): training
# only (`memsvc train --phrasing grammar`); its words stay disjoint from the held-out ones.
GRAMMAR_PHRASING = replace(TRAIN_PHRASING, name="grammar", grammar=Grammar())
# The same with a third of the composed statements giving the value before the key (about
# one statement in six, as in the held-out phrasing): `--phrasing grammar-value-first`.
VALUE_FIRST_PHRASING = replace(
    TRAIN_PHRASING, name="grammar-value-first", grammar=Grammar(value_first=1 / 3)
)

# Evaluation only (`memsvc eval facts --phrasing value-first`): every sentence composed, every
# statement value first, in training words: can a model file a value under a later key?
VALUE_FIRST_ONLY_PHRASING = replace(
    TRAIN_PHRASING, name="value-first", grammar=Grammar(share=1.0, value_first=1.0)
)

PHRASINGS = {
    "train": TRAIN_PHRASING,
    "heldout": HELDOUT_PHRASING,
    "grammar": GRAMMAR_PHRASING,
    "grammar-value-first": VALUE_FIRST_PHRASING,
    "value-first": VALUE_FIRST_ONLY_PHRASING,
}
