"""The real-text corpus: roff and fortune readers, the split by source, reproducible builds,
and the reader's units (what haystacks are made of)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from memsvc.corpus import KINDS, Corpus
from memsvc.corpus.build import build_corpus
from memsvc.corpus.reader import MAX_UNIT_BYTES, SAMPLE_DIR, _split_line
from memsvc.corpus.sources import SOURCES, hashed_split, read_fortunes, roff_to_text


def test_roff_to_text_keeps_words_and_drops_markup() -> None:
    source = "\n".join([
        '.\\" a comment',
        ".de XX",
        "macro body that must vanish",
        "..",
        '.TH "LS" 1',
        ".SH NAME",
        "ls \\- list \\fBdirectory\\fR contents",
        ".PP",
        ".B \"-a\"",
        "do not ignore entries starting with \\(lq.\\(rq",
    ])  # fmt: skip
    text = roff_to_text(source)
    assert "NAME" in text and "ls - list directory contents" in text and "-a" in text
    assert 'starting with "."' in text
    assert "macro body" not in text and "comment" not in text and "\\f" not in text


def test_fortunes_split_on_percent_lines_and_lose_colour_codes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("\x1b[32mfirst\x1b[m\nline\n%\nsecond\n%\n")
    assert read_fortunes(path) == "first\nline\n\nsecond\n"


def test_split_is_by_document_id_stable_and_about_a_fifth_held_out() -> None:
    ids = [f"man/en/man1/tool{i}.1.gz" for i in range(2000)]
    splits = [hashed_split(i) for i in ids]
    assert splits == [hashed_split(i) for i in ids]
    assert 0.15 < splits.count("eval") / len(splits) < 0.25


def test_every_kind_has_a_source() -> None:
    assert {s.kind for s in SOURCES} == set(KINDS)


@pytest.mark.parametrize("kind", ["english", "code", "json"])
def test_build_is_reproducible_and_splits_never_share_a_document(tmp_path: Path, kind: str) -> None:
    budget = {"train": 12_000, "eval": 12_000}
    first = build_corpus(tmp_path / "a", [kind], budget)["kinds"][kind]
    second = build_corpus(tmp_path / "b", [kind], budget)["kinds"][kind]
    assert first == second
    for split in ("train", "eval"):
        data = (tmp_path / "a" / kind / f"{split}.txt").read_bytes()
        assert data == (tmp_path / "b" / kind / f"{split}.txt").read_bytes()
        assert 0 < len(data) <= budget[split] and first[split]["bytes"] == len(data)
    train = {s.id for s in _documents(kind) if s.split == "train"}
    held_out = {s.id for s in _documents(kind) if s.split == "eval"}
    assert train and held_out and not train & held_out


def _documents(kind: str):
    return [d for s in SOURCES if s.kind == kind and s.available() for d in s.documents()]


def test_unknown_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown corpus kinds"):
        build_corpus(tmp_path, ["klingon"])


def test_long_lines_become_units_of_bounded_bytes_without_losing_text() -> None:
    line = "汉字 and words " * 100
    units = _split_line(line)
    assert "".join(units) == line + "\n"
    assert all(len(u.encode()) <= MAX_UNIT_BYTES for u in units)


def test_committed_sample_has_every_kind_and_reads_as_units() -> None:
    corpus = Corpus(SAMPLE_DIR)
    for kind in KINDS:
        for split in ("train", "eval"):
            units = corpus.units(kind, split)
            assert units and all(u.endswith("\n") or len(u.encode()) > 100 for u in units)
        taken = corpus.take(kind, "eval", random.Random(1), 3000)
        assert sum(len(u.encode()) for u in taken) >= 3000
    assert (SAMPLE_DIR / "chinese" / "eval.txt").read_text().count("的") > 5


def test_missing_corpus_says_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="memsvc corpus build"):
        Corpus(tmp_path).units("english", "train")
