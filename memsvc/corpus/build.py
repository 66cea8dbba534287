"""`build_corpus`: gather the real-text corpus into a directory, reproducibly.

    OUT/<kind>/train.txt    documents of the training split, separated by blank lines
    OUT/<kind>/eval.txt     the held-out documents (never trained on)
    OUT/manifest.json       per kind and split: bytes, documents, sources, sha256

Within a kind, sources take turns document by document (so one large family
does not crowd out the others), each in a fixed pseudo-random order of its
document ids, until the split's byte budget is spent. The same machine
packages give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from memsvc.corpus.sources import KINDS, SOURCES, SPLITS, Document, Source, Split

log = structlog.get_logger(__name__)

MAX_DOCUMENT_BYTES = 32 * 1024  # a longer document is cut (at a line end): more variety per MB
MIN_DOCUMENT_BYTES = 64  # shorter documents (or what a nearly spent budget leaves) are skipped
DEFAULT_BUDGET: dict[Split, int] = {"train": 4 << 20, "eval": 2 << 20}


class MissingSourceError(RuntimeError):
    """A kind has no source on this machine; the message says what to install."""


@dataclass
class SplitReport:
    bytes: int = 0
    documents: int = 0
    sources: dict[str, int] = field(default_factory=dict)  # source name -> documents taken
    sha256: str = ""


def _order(documents: Iterable[Document]) -> list[Document]:
    return sorted(documents, key=lambda d: hashlib.blake2b(d.id.encode(), digest_size=8).digest())


def _clean(text: str, limit: int) -> str:
    """The document with normalised line ends, cut at a line end to at most `limit` bytes."""
    text = text.replace("\r\n", "\n").replace("\x00", "")
    text = "\n".join(line.rstrip() for line in text.splitlines())
    text = text.strip("\n")
    if len(text.encode()) > limit:
        cut = text.encode()[:limit].decode("utf-8", errors="ignore")
        text = cut[: cut.rfind("\n")] if "\n" in cut else cut
    return text


def _round_robin(
    queues: list[tuple[Source, Iterator[Document]]],
) -> Iterator[tuple[Source, Document]]:
    while queues:
        for entry in list(queues):
            source, documents = entry
            document = next(documents, None)
            if document is None:
                queues.remove(entry)
            else:
                yield source, document


def build_kind(kind: str, out: Path, budget: dict[Split, int]) -> dict[Split, SplitReport]:
    """Write OUT/<kind>/<split>.txt from every available source of `kind`."""
    sources = [s for s in SOURCES if s.kind == kind]
    present = [s for s in sources if s.available()]
    for source in sources:
        if source not in present:
            log.warning(
                "corpus_source_missing", kind=kind, source=source.name, install=source.install
            )
    if not present:
        wanted = "; ".join(f"{s.name} ({s.install})" for s in sources)
        raise MissingSourceError(
            f"no source of kind {kind!r} on this machine: install {wanted} "
            "(scripts/corpus-deps installs every source)"
        )
    reports: dict[Split, SplitReport] = {}
    (out / kind).mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        report = SplitReport()
        queues = [(s, iter(_order(d for d in s.documents() if d.split == split))) for s in present]
        digest = hashlib.sha256()
        with open(out / kind / f"{split}.txt", "w", encoding="utf-8", newline="\n") as file:
            for source, document in _round_robin(queues):
                if budget[split] - report.bytes < MIN_DOCUMENT_BYTES:
                    break
                limit = min(MAX_DOCUMENT_BYTES, budget[split] - report.bytes)
                text = _clean(document.read(), limit)
                if len(text.encode()) < MIN_DOCUMENT_BYTES:
                    continue
                data = text + "\n\n"
                file.write(data)
                digest.update(data.encode())
                report.bytes += len(data.encode())
                report.documents += 1
                report.sources[source.name] = report.sources.get(source.name, 0) + 1
        report.sha256 = digest.hexdigest()
        reports[split] = report
        log.info(
            "corpus_split_built",
            kind=kind,
            split=split,
            bytes=report.bytes,
            documents=report.documents,
        )
    return reports


def build_corpus(
    out: Path, kinds: Sequence[str] = KINDS, budget: dict[Split, int] | None = None
) -> dict:
    """Build every kind of `kinds` under `out` and write the manifest; returns it."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown corpus kinds {unknown} (known: {', '.join(KINDS)})")
    budget = budget or DEFAULT_BUDGET
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"kinds": {}}
    for kind in kinds:
        reports = build_kind(kind, out, budget)
        manifest["kinds"][kind] = {split: vars(r) for split, r in reports.items()}
    manifest["kinds"] = dict(sorted(manifest["kinds"].items()))
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest
