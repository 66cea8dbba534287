"""Shared rule for the project's frozen config dataclasses read back from JSON."""

from __future__ import annotations

from dataclasses import fields
from typing import Any


def require_known_fields(cls: type, data: dict[str, Any]) -> None:
    """Refuse keys the dataclass does not have (a typo must not silently vanish)."""
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
