"""The README, the docs and the code point only inside the repository: a clone has no
`../shared/` and no DESIGN.md, so a reference to either is a dead end for a reader."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTSIDE = re.compile(r"\.\./shared|DESIGN\.md|notes/trainability")
SCANNED = ("README.md", "docs", "memsvc", "kernels", "ops", "scripts", "migrations", "proto")
SUFFIXES = {".md", ".py", ".proto", ".yml", ".yaml", ".toml", ".json", ".ini", ""}


def _files() -> list[Path]:
    found = []
    for name in SCANNED:
        path = ROOT / name
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        found += [
            p
            for p in candidates
            if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts
        ]
    return found


def test_nothing_points_outside_the_repository() -> None:
    files = _files()
    assert len(files) > 100
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert offenders == []


def test_the_documents_the_readme_names_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"`(docs/[A-Z]+\.md)`", readme))
    assert {"docs/ARCHITECTURE.md", "docs/CLIENTS.md"} <= named
    assert all((ROOT / doc).is_file() for doc in named)
