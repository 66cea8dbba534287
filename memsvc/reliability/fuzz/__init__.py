"""Bad input, generated: every RPC's requests and the session files, made adversarial.

Shared by the test suite and `memsvc bench reliability`; `calls` (the RPCs, sending
one call) and `mutations` (damage to files) are plain Python, `strategies` and
`campaign` need hypothesis, which the `reliability` extra installs
(`require_hypothesis` says so before anything runs). The pieces:

* Request strategies (``strategies.call_strategies``): for each RPC of MemoryService and
  AdminService, calls whose messages are structurally valid protobufs holding
  hostile values (empty, huge, NUL-laden or foreign session ids; token ids
  outside the vocabulary; NaN, subnormal and out-of-range sampling params;
  oversized inputs; streams that append before they open, or open twice;
  imports of damaged or crafted exports), under valid or broken credentials.
  Each RPC also has a ``:raw`` twin that sends bytes no protobuf decoder
  accepts as the message body (a generic channel call without a serializer).
* File mutations: ``FILE_MUTATIONS`` damages any file byte by byte (bit flips,
  truncations, insertions, overwrites, deletions); ``CHECKPOINT_MUTATIONS``
  adds damage aimed at a checkpoint's or export's safetensors header (odd
  values, unparsable or absurdly nested JSON, framing kept valid); and
  ``STATE_EDITS`` crafts what no disk damage makes: a state re-encoded with a
  valid checksum but wrong tensors, as a hostile client could send.
* ``campaign.run_bad_input_campaign``: sends N generated calls per RPC to a running
  server and checks that each is answered with a status that names what was
  wrong (``CLEAN_CODES``; never UNKNOWN or INTERNAL, never a hang), that the
  server still answers health checks, that a session nobody addressed (the
  sentinel) keeps its position and state, and that every session a call
  created still works. Hypothesis drives the generation (``@given`` with a
  seed); the campaign records failures instead of stopping at the first, and
  ``fuzz_rpc(..., shrink=True)`` stops and shrinks to a minimal failing call.

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
