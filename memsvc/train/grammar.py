"""A procedural grammar for the training phrasing of keyed facts.

The training phrasing's fixed templates (phrasing.py) are a few dozen sentences. A model
trained on them learns those sentences: their exact words trigger the write and the read,
and a held-out question template does not trigger the read at all (docs/TRAINING.md). This
grammar composes statements, revisions, questions and answer leads from parts (how the key
and attribute are referred to, the connective, the frame, the record syntax), so the words
around a fact vary from one sentence to the next and what stays constant is the key, the
attribute and the value: thousands of templates instead of dozens.

Every template uses the placeholders of `Phrasing.render` ({key}, {Key}, {keys}, {Keys},
{attr}, {value}). None of the held-out generator's distinctive words appear in any part
(`HELDOUT_WORDS`; tests/train/test_grammar.py checks every part), so held-out phrasing
stays unseen.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# What the held-out phrasing says that no part here may say (lower case, as substrings of a
# part's words): its verbs and connectives, its leads' openings.
HELDOUT_WORDS = (
    "goes by",
    "assigned",
    "reads",
    "lists",
    "belonging",
    "for later",
    "in case",
    "save this",
    "quick note",
    "heads up",
    "instead",
    "fresh",
    "as of today",
    "has been changed",
    "could you",
    "look up",
    "i need the",
    "did we note",
    "sure",
    "answer",
    "->",
    "(",
)

# How a fact's key and attribute are named together (a noun phrase).
_REFS = (
    "{keys} {attr}",
    "the {attr} of {key}",
    "the {attr} for {key}",
    "{keys} current {attr}",
    "the {attr} that {key} has",
    "the {attr} {key} uses",
    "{keys} stored {attr}",
    "{key}/{attr}",
    "{key}.{attr}",
)
_CONNECTIVES = (
    "is",
    "=",
    ":",
    "is set to",
    "equals",
    "was set to",
    "will be",
    "stays",
    "is registered as",
    "was given as",
    "comes out as",
    "shows",
    "is recorded as",
)
# Words between the key and the value, so the value is filed under the key named a clause
# back, not under the last few bytes before it.
_ASIDES = (
    "",
    "",
    "",
    ", as discussed,",
    ", for the files,",
    ", to be safe,",
    " by the way",
    ", just so you know,",
    " for this week",
    ", if anyone asks,",
    " on our side",
    ", last time I checked,",
)
_HAVE_VERBS = ("has", "uses", "picked", "got", "keeps", "holds", "received", "owns", "set")
_AS = ("as the", "for the", "as", "for")
_RECORDS = (
    '{{"key": "{key}", "{attr}": "{value}"}}',
    "{key}\t{attr}\t{value}",
    "[{key}] {attr}: {value}",
    "{key}; {attr}; {value}",
    "- {attr} of {key}: {value}",
    "{attr}[{key}] = {value}",
    "set {key} {attr} {value}",
    "<{key}> {attr}={value}",
)
_TAILS = ("", "", "", " now", " since Monday", " at the moment", " for good")
# Statements that give the value before the key (the held-out phrasing has one): with
# lookahead keys nothing at the value's bytes can file it under its key, so the model has
# to carry the value to where the key is named (Grammar.value_first; off by default).
_VALUE_FIRST = (
    "{value} is {ref}.",
    "{value}, that is {ref}.",
    "{value} was picked as {ref}.",
    "we keep {value} as {ref}.",
    "note {value}: it is {ref}.",
    "{value} will be used as {ref}.",
    "the value {value} stands for {ref}.",
    "write down {value} for {ref}.",
    '{{"{attr}": "{value}", "key": "{key}"}}',
    "{value} = {key}.{attr}",
)
_INTERJECTIONS = ("", "", "", "", "okay, ", "right, ", "well, ", "by the way, ", "hm, ")
_NOW = ("now", "from today", "these days", "from here on")
_CHANGED = ("changed", "updated", "moved", "switched", "reset")
_QUESTION_FRAMES = (
    "what is {ref}?",
    "what's {ref}?",
    "tell me {ref}.",
    "{ref}?",
    "do you know {ref}?",
    "can you tell me {ref}?",
    "please recall {ref}.",
    "which value is {ref}?",
    "I'd like {ref}.",
    "show {ref}.",
    "fetch {ref}.",
    "retrieve {ref}.",
    "{ref}, please.",
    "how about {ref}?",
    "what value does {key} have for {attr}?",
    "what value was given for {ref}?",
    "remind me, what was {ref}?",
    "do we still have {ref}?",
    "what did you store as {ref}?",
    "which {attr} goes with {key}?",
)
_ACKS = (
    "",
    "",
    "Yes. ",
    "Okay: ",
    "Right, ",
    "Got it: ",
    "Certainly. ",
    "Of course: ",
    "Here: ",
    "Let me check. ",
    "Noted: ",
    "Yep, ",
)
_LEAD_FRAMES = (
    "{ref} {conn} ",
    "it {conn} ",
    "{ref}: ",
    "value: ",
    "that's ",
    "{key} {have} ",
    "stored: ",
)


@dataclass(frozen=True)
class Grammar:
    """Composes templates; `share` is the chance that a phrasing draws from it rather than
    from its fixed templates."""

    share: float = 0.5
    value_first: float = 0.0  # the share of composed statements that give the value first

    def statement(self, rng: random.Random) -> str:
        if self.value_first and rng.random() < self.value_first:
            frame = rng.choice(_VALUE_FIRST)
            return rng.choice(_INTERJECTIONS) + frame.replace("{ref}", rng.choice(_REFS))
        pick = rng.random()
        aside = rng.choice(_ASIDES)
        if pick < 0.4:
            body = f"{rng.choice(_REFS)}{aside} {rng.choice(_CONNECTIVES)} {{value}}."
        elif pick < 0.55:
            body = f"{{Key}} {rng.choice(_HAVE_VERBS)} {{value}} {rng.choice(_AS)} {{attr}}."
        elif pick < 0.75:  # the attribute right before the value, the key a clause back
            verb = rng.choice(_HAVE_VERBS)
            body = f"{{Key}}{aside} {verb} the {{attr}} {{value}}{rng.choice(_TAILS)}."
        else:
            body = rng.choice(_RECORDS)
        return rng.choice(_INTERJECTIONS) + body.replace(" :", ":")

    def revision(self, rng: random.Random) -> str:
        pick = rng.random()
        ref, now = rng.choice(_REFS), rng.choice(_NOW)
        if pick < 0.4:
            body = f"{ref} {rng.choice(_CONNECTIVES)} {now} {{value}}."
        elif pick < 0.7:
            body = f"{ref} {rng.choice(_CHANGED)} to {{value}}."
        else:
            body = f"{{Key}} {rng.choice(_CHANGED)} the {{attr}}, {now} {{value}}."
        return rng.choice(_INTERJECTIONS) + body.replace(" :", ":")

    def question(self, rng: random.Random) -> str:
        frame = rng.choice(_QUESTION_FRAMES)
        return rng.choice(_INTERJECTIONS) + frame.replace("{ref}", rng.choice(_REFS))

    def lead(self, rng: random.Random) -> str:
        frame = rng.choice(_LEAD_FRAMES)
        text = frame.format(
            ref=rng.choice(_REFS),
            conn=rng.choice(_CONNECTIVES),
            have=rng.choice(_HAVE_VERBS),
            key="{key}",
        )
        return rng.choice(_ACKS) + text.replace(" :", ":")

    @staticmethod
    def parts() -> tuple[str, ...]:
        """Every word list the grammar draws from (the held-out check reads these)."""
        lists = (
            _REFS,
            _ASIDES,
            _TAILS,
            _CONNECTIVES,
            _HAVE_VERBS,
            _AS,
            _RECORDS,
            _VALUE_FIRST,
            _INTERJECTIONS,
            _NOW,
            _CHANGED,
            _QUESTION_FRAMES,
            _ACKS,
            _LEAD_FRAMES,
        )
        return tuple(part for parts in lists for part in parts)
