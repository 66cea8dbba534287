"""Checks of a request's arguments, made before anything changes (InvalidRequestError and kin)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import Tensor

from memsvc.engine import StreamingEngine
from memsvc.sessions.api import InvalidRequestError, SessionNotFoundError
from memsvc.sessions.config import MAX_NAME_LENGTH

# Session ids are canonical UUIDs (store.models.new_id); anything else names no session.
_SESSION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def check_session_id(session_id: str) -> None:
    """SessionNotFoundError for anything that is not a session id (it names no session)."""
    if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
        raise SessionNotFoundError(f"session {session_id!r} not found")


def check_name(name: str) -> None:
    if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH or "\x00" in name:
        raise InvalidRequestError(
            f"a session name is a string of at most {MAX_NAME_LENGTH} characters, "
            "without NUL characters"
        )


def check_knobs(step_scale: float, forget_boost: float) -> None:
    """The mitigation knobs' ranges (``ModelState.with_mitigation``)."""
    if not (0.0 < step_scale <= 1.0 and 0.0 <= forget_boost < 1.0):
        raise InvalidRequestError(
            f"need 0 < step_scale <= 1 and 0 <= forget_boost < 1, "
            f"got {step_scale} and {forget_boost}"
        )


def token_ids(engine: StreamingEngine, tokens: Sequence[int], most: int) -> Tensor:
    """The token ids as the engine takes them; InvalidRequestError before anything changes."""
    try:
        count = len(tokens)
    except TypeError as error:
        raise InvalidRequestError("tokens must be a sequence of token ids") from error
    if count == 0:
        raise InvalidRequestError("no tokens")
    if count > most:
        raise InvalidRequestError(f"{count} tokens in one request; the most is {most}")
    try:
        return engine.as_tokens(tokens)  # integer ids inside the vocabulary, 1-D
    except (ValueError, TypeError, RuntimeError) as error:
        raise InvalidRequestError(str(error)) from error
