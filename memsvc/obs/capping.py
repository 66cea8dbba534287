"""Caps on what a request can make the service echo: ids and names in error messages
and log lines.

A client chooses its session ids and names; echoed whole, a 1 MB id wrote a 2 MB log
line per request (and came back in the status). Ids the service issues are 36
characters, so a cap far above that never hides a real one.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

ID_LIMIT = 128  # characters of an id or a name, as echoed
MESSAGE_LIMIT = 2048  # characters of an error message or a log value


def capped(text: str, limit: int = ID_LIMIT) -> str:
    """``text``, or its first ``limit`` characters and how many more there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more characters]"


def cap_log_values(
    _logger: object, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor: every string value of an event capped at MESSAGE_LIMIT
    (it runs before tracebacks are rendered, which it leaves whole)."""
    for key, value in event.items():
        if isinstance(value, str) and len(value) > MESSAGE_LIMIT:
            event[key] = capped(value, MESSAGE_LIMIT)
    return event
