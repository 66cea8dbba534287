"""Bad input, generated: every RPC's requests and the session files, made adversarial.

Shared by the test suite and `memsvc bench reliability`: `calls` (the RPCs, one call
sent and answered), `mutations` (damage to session files), `strategies` (hypothesis
strategies for both), `campaign` (N generated calls per RPC against a running server,
every answer checked). The last two need hypothesis, from the `reliability` extra;
`require_hypothesis` says so before anything runs.

The campaign's tenant must have a tokens-per-minute quota below 2**31 (the
default is one million): the generated huge ``max_new_tokens`` values are meant
to be refused by the rate limit, not served.
"""

from __future__ import annotations

EXTRA_HINT = "pip install 'memsvc[reliability]'"


class MissingExtraError(ImportError):
    """A part of memsvc needs an optional dependency that is not installed."""


def require_hypothesis() -> None:
    """Raises MissingExtraError, naming the extra, when hypothesis cannot be imported."""
    try:
        import hypothesis  # noqa: F401
    except ImportError as error:
        raise MissingExtraError(
            f"the fuzz campaign needs hypothesis, from the `reliability` extra: {EXTRA_HINT}"
        ) from error
