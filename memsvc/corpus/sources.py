"""Where the real-text corpus comes from: one `Source` per family of files on this machine.

Each source lists its documents (a file, or one record of a generator) under a
stable id, says which split every document belongs to, and turns a document
into plain UTF-8 text. Splits are decided per document id (a hash of the id, or
the whole family), never per line, so no held-out line is ever trained on.

The files come from Debian packages and the Python standard library; the
generated kinds (JSON records, log lines) from Faker. `scripts/corpus-deps`
installs all of them; a missing source is reported by name and package.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Split = Literal["train", "eval"]
SPLITS: tuple[Split, ...] = ("train", "eval")
KINDS = ("english", "chinese", "german", "japanese", "code", "json", "logs")

MAN = Path("/usr/share/man")
FORTUNES = Path("/usr/share/games/fortunes")
DOC = Path("/usr/share/doc")
LICENSES = Path("/usr/share/common-licenses")


@dataclass(frozen=True)
class Document:
    id: str  # stable across machines: a path relative to its root, or a generator key
    split: Split
    read: Callable[[], str]


@dataclass(frozen=True)
class Source:
    """A family of documents of one kind."""

    kind: str
    name: str
    install: str  # how to get it: Debian packages or a pip extra
    documents: Callable[[], Iterator[Document]]
    available: Callable[[], bool]


def hashed_split(doc_id: str, eval_share: float = 0.2) -> Split:
    """The split of a document: a stable hash of its id, `eval_share` of them held out."""
    digest = hashlib.blake2b(doc_id.encode(), digest_size=8).digest()
    return "eval" if int.from_bytes(digest, "little") / 2**64 < eval_share else "train"


# ---- readers --------------------------------------------------------------------------------

_ROFF_ESCAPES = (
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\s[+-]?\d"), ""),  # size changes
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),  # strings
    (re.compile(r"\\\((em|en)"), "-"),
    (re.compile(r"\\\((lq|rq|dq)"), '"'),
    (re.compile(r"\\\((oq|cq|aq)"), "'"),
    (re.compile(r"\\\(bu"), "*"),
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),
    (re.compile(r"\\[-e]"), lambda m: "-" if m.group(0) == "\\-" else "\\"),
    (re.compile(r"\\[&|^%:]|\\c$"), ""),
    (re.compile(r"\\ "), " "),
)
_ROFF_KEEP = {"SH", "SS", "B", "I", "BI", "IB", "BR", "RB", "IR", "RI", "TP", "IP", "Nm", "Nd"}


def roff_to_text(source: str) -> str:
    """Plain text of a manual page's roff source: macro lines dropped or reduced to their
    words, escapes removed. Crude but deterministic and fast (no groff run)."""
    out: list[str] = []
    in_definition = False
    for raw in source.splitlines():
        line = raw.rstrip()
        if in_definition:
            in_definition = line != ".."
            continue
        if line.startswith((".de ", ".de\t", ".am ")):
            in_definition = True
            continue
        if line.startswith(("'", '.\\"', "'\\\"")) or line in (".", "'"):
            continue
        if line.startswith("."):
            macro, _, rest = line[1:].partition(" ")
            if macro in ("PP", "P", "LP", "sp", "br", "TP", "IP", "Pp", "RS", "RE"):
                out.append("")
            if macro not in _ROFF_KEEP or not rest:
                continue
            line = rest.replace('"', "")
        for pattern, replacement in _ROFF_ESCAPES:
            line = pattern.sub(replacement, line)
        out.append(line.replace("\\", ""))
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def read_man(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return roff_to_text(raw.decode("utf-8", errors="replace"))


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def read_fortunes(path: Path) -> str:
    """A fortune file's entries (separated by lines of "%"), colour codes removed."""
    text = _ANSI.sub("", path.read_text(encoding="utf-8", errors="replace"))
    entries = [e.strip("\n") for e in re.split(r"^%$", text, flags=re.MULTILINE)]
    return "\n\n".join(e for e in entries if e.strip()) + "\n"


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


# ---- families -------------------------------------------------------------------------------


def _files(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.glob(pattern) if p.is_file() and not p.is_symlink())


def _man_pages(lang: str | None) -> Callable[[], Iterator[Document]]:
    root = MAN if lang is None else MAN / lang

    def documents() -> Iterator[Document]:
        for path in _files(root, "man[1-8]/*"):
            doc_id = f"man/{lang or 'en'}/{path.relative_to(root)}"
            yield Document(doc_id, hashed_split(doc_id), lambda p=path: read_man(p))

    return documents


def _man_available(lang: str | None, least: int = 50) -> Callable[[], bool]:
    root = MAN if lang is None else MAN / lang
    return lambda: len(_files(root, "man[1-8]/*")) >= least


_ZH_FORTUNES = {"chinese": "train", "tang300": "train", "song100": "eval"}


def _fortunes(chinese: bool) -> Callable[[], Iterator[Document]]:
    def documents() -> Iterator[Document]:
        for path in _files(FORTUNES, "*"):
            if path.suffix in (".dat", ".u8") or (path.name in _ZH_FORTUNES) != chinese:
                continue
            doc_id = f"fortunes/{path.name}"
            split = _ZH_FORTUNES.get(path.name) or hashed_split(doc_id)
            yield Document(doc_id, split, lambda p=path: read_fortunes(p))  # type: ignore[arg-type]

    return documents


def _licences() -> Iterator[Document]:
    """Licence texts and package copyright files: all held out (legal English prose never
    trained on, the haystack that exposed the shipped model)."""
    for path in _files(LICENSES, "*"):
        yield Document(f"licences/{path.name}", "eval", lambda p=path: read_text(p))
    for path in _files(DOC, "*/copyright"):
        yield Document(f"doc/{path.parent.name}/copyright", "eval", lambda p=path: read_text(p))


def _stdlib_root() -> Path:
    return Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"


def _stdlib() -> Iterator[Document]:
    root = _stdlib_root()
    for path in _files(root, "**/*.py"):
        rel = path.relative_to(root)
        if rel.parts[0] in ("site-packages", "test", "idlelib", "lib2to3") or "tests" in rel.parts:
            continue
        doc_id = f"stdlib/{rel}"
        yield Document(doc_id, hashed_split(doc_id), lambda p=path: read_text(p))


def _faker_available() -> bool:
    try:
        import faker  # noqa: F401
    except ImportError:
        return False
    return True


def _generated(kind: str) -> Callable[[], Iterator[Document]]:
    def documents() -> Iterator[Document]:
        from memsvc.corpus import generated

        yield from generated.documents(kind)

    return documents


SOURCES: tuple[Source, ...] = (
    Source("english", "man pages (English)", "Debian: man-db manpages", _man_pages(None),
           _man_available(None)),
    Source("english", "fortunes", "Debian: fortunes", _fortunes(False),
           lambda: (FORTUNES / "fortunes").is_file()),
    Source("english", "licences and copyright files", "Debian (always present)", _licences,
           lambda: LICENSES.is_dir()),
    Source("chinese", "man pages (zh_CN)", "Debian: manpages-zh", _man_pages("zh_CN"),
           _man_available("zh_CN")),
    Source("chinese", "fortunes (Chinese poems)", "Debian: fortunes-zh", _fortunes(True),
           lambda: (FORTUNES / "tang300").is_file()),
    Source("german", "man pages (de)", "Debian: manpages-de", _man_pages("de"),
           _man_available("de", 200)),
    Source("japanese", "man pages (ja)", "Debian: manpages-ja", _man_pages("ja"),
           _man_available("ja", 200)),
    Source("code", "Python standard library", "the Python installation", _stdlib,
           lambda: (_stdlib_root() / "os.py").is_file()),
    Source("json", "JSON records (Faker)", "pip: memsvc[corpus] (faker)", _generated("json"),
           _faker_available),
    Source("logs", "log lines (Faker)", "pip: memsvc[corpus] (faker)", _generated("logs"),
           _faker_available),
)  # fmt: skip
