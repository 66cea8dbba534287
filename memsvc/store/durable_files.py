"""Crash-safe replacement: write a temporary, fsync, rename over the target, fsync the directory.

After ``write_atomically`` returns, the file is durable under its name; if the
process or the machine dies at any point before, the name still holds the old
content (or nothing) and at worst a temporary is left behind, which
``remove_temporaries`` clears.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMPORARY_SUFFIX = ".tmp"


def fsync_directory(directory: Path) -> None:
    """Makes the directory's entries (creations, renames, deletions) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> int:
    """Replaces ``path`` with what ``write`` writes to the file it is given; returns its size."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}")
    try:
        with open(temporary, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
            size = file.tell()
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return size


def remove_temporaries(directory: Path) -> list[Path]:
    """Deletes temporaries left by interrupted ``write_atomically`` calls; returns them.

    Call it only while nothing writes into ``directory`` (for instance when a
    session is restored), or an in-flight write loses its temporary.
    """
    removed = []
    for candidate in Path(directory).glob(f".*{TEMPORARY_SUFFIX}"):
        candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed
