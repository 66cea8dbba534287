"""Reading a built corpus: haystack units (lines) of one kind and split.

A unit is one line of a document (a blank line between documents is a unit
too), at most `MAX_UNIT_BYTES` bytes: a longer line is cut at a space or a
character boundary. Units are what needles and facts are inserted between,
like the sentences of the synthetic haystacks.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from memsvc.corpus.sources import KINDS, Split

MAX_UNIT_BYTES = 240  # below the eval probes' snapping margin (memsvc/eval/probe.py)
SAMPLE_DIR = Path(__file__).resolve().parent.parent / "assets" / "corpus-sample"


def default_corpus_dir() -> Path:
    """$MEMSVC_CORPUS_DIR, else ~/.cache/memsvc/corpus (where `memsvc corpus build` writes)."""
    configured = os.environ.get("MEMSVC_CORPUS_DIR")
    if configured:
        return Path(configured)
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "memsvc" / "corpus"


def _split_line(line: str) -> list[str]:
    """`line` + "\\n" as units of at most MAX_UNIT_BYTES bytes each."""
    out: list[str] = []
    rest = line + "\n"
    while len(rest.encode()) > MAX_UNIT_BYTES:
        head = rest.encode()[:MAX_UNIT_BYTES].decode("utf-8", errors="ignore")
        cut = head.rfind(" ")
        head = head[: cut + 1] if cut > len(head) // 2 else head
        out.append(head)
        rest = rest[len(head) :]
    out.append(rest)
    return out


class Corpus:
    """The units of a built corpus directory (`memsvc corpus build`)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def path(self, kind: str, split: Split) -> Path:
        if kind not in KINDS:
            raise ValueError(f"unknown corpus kind {kind!r} (known: {', '.join(KINDS)})")
        return self.root / kind / f"{split}.txt"

    def units(self, kind: str, split: Split) -> tuple[str, ...]:
        return _load_units(self.path(kind, split))

    def stream(self, kind: str, split: Split, rng: random.Random) -> Iterator[str]:
        """Units from a random line on, wrapping around at the end, forever."""
        units = self.units(kind, split)
        i = rng.randrange(len(units))
        while True:
            yield units[i]
            i = (i + 1) % len(units)

    def take(self, kind: str, split: Split, rng: random.Random, n_bytes: int) -> list[str]:
        """Consecutive units from a random line on, at least `n_bytes` bytes in all."""
        out, total = [], 0
        for unit in self.stream(kind, split, rng):
            if total >= n_bytes:
                break
            out.append(unit)
            total += len(unit.encode())
        return out


@cache
def _load_units(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: build the corpus first (`memsvc corpus build`, after "
            "scripts/corpus-deps), or point MEMSVC_CORPUS_DIR at a built one"
        )
    units: list[str] = []
    for line in path.read_text(encoding="utf-8").split("\n")[:-1]:
        units += _split_line(line)
    if not units:
        raise ValueError(f"{path} holds no text")
    return tuple(units)


@cache
def open_corpus(root: str | None = None) -> Corpus:
    """The corpus at `root`, else the default directory, else the small committed sample
    (memsvc/assets/corpus-sample: enough for tests and the recall canary, not for training)."""
    if root is not None:
        return Corpus(root)
    built = default_corpus_dir()
    return Corpus(built if (built / "manifest.json").is_file() else SAMPLE_DIR)
