"""Hypothesis strategies, and the regressions that once failed.

* Calls (``call_strategies``): for each RPC of MemoryService and AdminService,
  structurally valid protobufs holding hostile values (empty, huge, NUL-laden or
  foreign session ids; token ids outside the vocabulary; NaN, subnormal and
  out-of-range sampling params; oversized inputs; streams that append before they
  open, or open twice; imports of damaged or crafted exports), under valid or
  broken credentials. Each RPC also has a ``:raw`` twin whose bodies no protobuf
  decoder accepts. ``regression_calls``: calls that once failed.
* Files: ``FILE_MUTATIONS`` damages any file byte by byte; ``CHECKPOINT_MUTATIONS``
  aims at a checkpoint's or export's safetensors header (framing kept valid);
  ``STATE_EDITS`` re-encodes a state with a valid checksum but wrong tensors.
"""

from __future__ import annotations

import itertools
import math
import string
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from google.protobuf.message import Message
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from memsvc.model.tokenizer import VOCAB_SIZE
from memsvc.proto.v1 import memsvc_pb2 as pb
from memsvc.reliability.fuzz.calls import METHODS, Credentials, FuzzCall, bearer, unsigned_call
from memsvc.reliability.fuzz.mutations import (
    STATE_CHANGES,
    BitFlip,
    Delete,
    HeaderEdit,
    HeaderReplace,
    Insert,
    Mutation,
    Mutations,
    Overwrite,
    StateEdit,
    Truncate,
    json_bytes,
)

_OFFSETS = st.one_of(st.integers(0, 63), st.integers(0, 2**32))
_CHUNKS = st.one_of(
    st.binary(min_size=1, max_size=16), st.sampled_from([b"\x00" * 8, b"\xff" * 8, b"MWRC"])
)
_BYTE_MUTATION: SearchStrategy[Mutation] = st.one_of(
    st.builds(BitFlip, _OFFSETS, st.integers(0, 7)),
    st.builds(Truncate, _OFFSETS),
    st.builds(Insert, _OFFSETS, _CHUNKS),
    st.builds(Overwrite, _OFFSETS, _CHUNKS),
    st.builds(Delete, _OFFSETS, st.integers(1, 64)),
)
# Damage to any file, byte by byte.
FILE_MUTATIONS: SearchStrategy[Mutations] = st.lists(_BYTE_MUTATION, min_size=1, max_size=3).map(
    lambda steps: Mutations(tuple(steps))
)

_JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),  # NaN and infinities too: Python's json reads them
    st.text(max_size=12),
    st.sampled_from(["1", "0", "-1", "1e3", "0x10", " 7 ", "\u0661", "9" * 5000]),
)
_JSON = st.recursive(
    _JSON_LEAVES,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)
_HEADER_KEYS = st.sampled_from(
    [
        "memsvc.format_version",
        "memsvc.model_hash",
        "memsvc.config_hash",
        "memsvc.position",
        "memsvc.wal_offset",
        "memsvc.checksum",
        "dtype",
        "shape",
        "data_offsets",
        "extra",
    ]
)
_RAW_HEADERS = st.one_of(
    st.binary(max_size=64),
    _JSON.map(json_bytes),
    st.sampled_from(
        [
            b"[" * 100_000 + b"]" * 100_000,  # nesting deeper than any recursion limit
            b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
            b'{"__metadata__":{"memsvc.format_version":"1"}}',
            b"\xef\xbb\xbf{}",  # a UTF-8 byte order mark
        ]
    ),
)
_STATE_VALUES = st.one_of(
    st.integers(0, 64), st.sampled_from([-1, -(2**63), 2**62, 2**63 - 1]), st.integers()
).map(lambda v: max(-(2**63), min(v, 2**63 - 1)))
# Damage to a checkpoint or an export: FILE_MUTATIONS, and safetensors headers rewritten
# (odd values, foreign keys, unparsable or absurdly nested JSON) with valid framing. A
# checksum stands between every one of them and a different state.
CHECKPOINT_MUTATIONS: SearchStrategy[Mutations] = st.lists(
    st.one_of(
        _BYTE_MUTATION,
        st.builds(HeaderEdit, _HEADER_KEYS, st.integers(0, 2**16), _JSON),
        st.builds(HeaderReplace, _RAW_HEADERS),
    ),
    min_size=1,
    max_size=2,
).map(lambda steps: Mutations(tuple(steps)))
# Damage that once got past a reader's own errors (TypeError, OverflowError, RecursionError
# from decode_checkpoint), kept as explicit examples.
CHECKPOINT_REGRESSIONS: tuple[Mutations, ...] = (
    Mutations((HeaderEdit("memsvc.position", 0, None),)),
    Mutations((HeaderEdit("memsvc.position", 0, math.inf),)),
    Mutations((HeaderReplace(b"[" * 100_000 + b"]" * 100_000),)),
)
# Crafted states that once got past the import: a position the engine cannot advance.
STATE_REGRESSIONS: tuple[Mutations, ...] = (Mutations((StateEdit("position", 0, 2**63 - 1),)),)
# Crafted states: a checkpoint or export re-encoded, checksum and all, with one tensor
# poisoned, recast, resized, dropped or added, or the position moved.
STATE_EDITS: SearchStrategy[Mutations] = st.builds(
    StateEdit,
    st.sampled_from(["position", "counter", *STATE_CHANGES]),
    st.integers(0, 2**16),
    _STATE_VALUES,
).map(lambda edit: Mutations((edit,)))


# ---- request strategies ------------------------------------------------------------------


def _mostly(common: SearchStrategy[Any], rare: SearchStrategy[Any], odds: int = 4) -> Any:
    """``common``, except one time in ``odds``: ``rare`` (the simplest example is common)."""
    return st.integers(0, odds - 1).flatmap(lambda i: rare if i == odds - 1 else common)


def _message(
    message_type: type[Message], /, **fields: SearchStrategy[Any]
) -> SearchStrategy[Message]:
    """Messages whose fields are drawn from ``fields``; a None leaves one unset."""
    return st.fixed_dictionaries(fields).map(
        lambda values: message_type(**{k: v for k, v in values.items() if v is not None})
    )


_U32 = st.integers(0, 2**32 - 1)
_U64 = st.integers(0, 2**64 - 1)
# Past a name's limit; past the tests' message limit (256 KiB); past the default (4 MiB).
_HUGE = st.sampled_from([10_000, 300_000, 5 << 20])
_TEXT = st.one_of(
    st.sampled_from(
        [
            "",
            " ",
            "\x00",
            "a\x00b",
            "\x00" * 64,
            "../../../etc/passwd",
            "' OR '1'='1",
            "%s%n%x",
            "\u202e\ufffd\U0010ffff",
            "\U0001f9e0" * 64,
            "null",
            "-1",
        ]
    ),
    st.text(max_size=64),
    st.uuids().map(str),
    _HUGE.map(lambda n: "x" * n),
)
_NAMES = _mostly(st.text(max_size=200), st.one_of(_TEXT, st.just("n" * 201)))


def _session_ids(live: Sequence[str]) -> SearchStrategy[str]:
    """Mostly a session that exists; else a near miss of one, or anything."""
    near = st.sampled_from(live).flatmap(
        lambda s: st.sampled_from(
            [s.upper(), f" {s}", f"{s}\x00", s[:-1], f"{s}0", s.replace("-", "")]
        )
    )
    return _mostly(st.sampled_from(live), st.one_of(near, _TEXT))


_IDS = st.lists(st.integers(0, VOCAB_SIZE - 1), min_size=1, max_size=24)
_BAD_ID = st.one_of(
    st.sampled_from([VOCAB_SIZE, VOCAB_SIZE + 1, 2**31 - 1, 2**31, 2**32 - 1]),
    st.integers(VOCAB_SIZE, 2**32 - 1),
)
_BAD_IDS = st.tuples(st.lists(st.integers(0, VOCAB_SIZE - 1), max_size=8), _BAD_ID, _IDS).map(
    lambda parts: [*parts[0], parts[1], *parts[2]]
)
_TOKENS: SearchStrategy[pb.Input] = _mostly(
    st.one_of(
        _IDS.map(lambda ids: pb.Input(token_ids=ids)),
        st.text(min_size=1, max_size=24).map(lambda text: pb.Input(text=text.encode())),
    ),
    st.one_of(
        st.just(pb.Input()),
        st.builds(
            lambda ids, text: pb.Input(token_ids=ids, text=text), _IDS, st.binary(min_size=1)
        ),
        _BAD_IDS.map(lambda ids: pb.Input(token_ids=ids)),
        st.binary(min_size=1, max_size=24).map(lambda text: pb.Input(text=text)),
        st.sampled_from([4097, 65_537]).map(lambda n: pb.Input(token_ids=[65] * n)),
        st.sampled_from([4097, 5 << 20]).map(lambda n: pb.Input(text=b"a" * n)),
    ),
)


def _expecting(message: pb.Input, position: int | None) -> pb.Input:
    if position is None:
        return message
    return pb.Input(token_ids=message.token_ids, text=message.text, expected_position=position)


# Sometimes an expected position: a stale one for an append, any for a prompt (where it
# has no place).
_INPUTS: SearchStrategy[pb.Input] = st.builds(
    _expecting, _TOKENS, _mostly(st.none(), st.one_of(st.integers(0, 300), _U64), odds=6)
)


_FLOATS = st.one_of(
    st.floats(width=32),
    st.sampled_from([0.0, -0.0, 1e-45, 1e-40, 1.2e-38, 1e-30, 3.4e38, -1.0, math.inf, math.nan]),
)


def _sometimes(valid: SearchStrategy[Any], hostile: SearchStrategy[Any]) -> Any:
    """An optional field: unset, a sound value, or (less often) a hostile one."""
    return st.one_of(st.none(), _mostly(valid, hostile, odds=3))


_PARAMS: SearchStrategy[pb.SamplingParams] = _message(
    pb.SamplingParams,
    temperature=_sometimes(st.floats(0.0625, 2.0, width=32), _FLOATS),
    top_k=_sometimes(st.integers(1, VOCAB_SIZE), st.sampled_from([0, VOCAB_SIZE + 1, 2**32 - 1])),
    top_p=_sometimes(st.floats(0.0625, 1.0, width=32), _FLOATS),
    # Always set, and a few tokens, so that generating stays cheap (the default is 256
    # tokens, seconds of a tiny model, and no bad input); or 0; or more than any
    # tenant's rate (refused before any work).
    max_new_tokens=_mostly(st.integers(1, 3), st.one_of(st.just(0), st.integers(2**31, 2**32 - 1))),
    stop=_mostly(
        st.lists(st.binary(min_size=1, max_size=4), max_size=2),
        st.one_of(
            st.lists(st.binary(max_size=4), min_size=1, max_size=3),  # empty ones too
            st.just([b"\x00" * 10_000]),
            st.just([bytes([i]) for i in range(256)]),
        ),
    ),
    allow_eos=st.none() | st.booleans(),
    seed=st.none() | _U64,
)
_PROMPTS = _message(pb.Prompt, input=_mostly(_INPUTS, st.none(), odds=12), params=_PARAMS)
_DEADLINES = _mostly(st.none(), st.sampled_from([0.0005, 0.005]), odds=16)
_TIERS = st.one_of(st.sampled_from(list(pb.Tier.values())), st.integers(-(2**31), 2**31 - 1))
_EVENT_KINDS = st.one_of(
    st.sampled_from(["", "mitigation", "corruption", "alert", "rollback", "lease"]), _TEXT
)
_KEY_TEXT = st.text(alphabet=string.ascii_letters + string.digits + "_-.", min_size=1, max_size=80)


def _credentials(key: str, other_key: str, label: str, other_label: str) -> Any:
    """Mostly ``key``; else none, a wrong one, a malformed header, or ``other_key``."""
    wrong = st.one_of(
        st.just(Credentials("none", ())),
        _KEY_TEXT.map(lambda k: Credentials(f"Bearer {k!r}", bearer(k))),
        _KEY_TEXT.map(lambda k: Credentials(f"{k!r} (no scheme)", (("authorization", k),))),
        st.just(Credentials("'Bearer ' (empty key)", (("authorization", "Bearer "),))),
        st.just(Credentials("Basic", (("authorization", "Basic YWxpY2U6c2VjcmV0"),))),
        st.just(Credentials(f"bearer {label} (lowercase)", (("authorization", f"bearer {key}"),))),
        st.just(Credentials(other_label, bearer(other_key))),
    )
    return _mostly(st.just(Credentials(label, bearer(key))), wrong, odds=6)


@dataclass(frozen=True)
class Targets:
    """What generated calls aim at: the tenant's key, the admin key, sessions of the tenant
    that they may name (and change, or delete), and a valid export to damage."""

    api_key: str
    admin_key: str
    session_ids: tuple[str, ...]
    export: bytes


def _stream_requests(ids: SearchStrategy[str]) -> SearchStrategy[tuple[pb.StreamRequest, ...]]:
    rid = _mostly(st.integers(0, 16), _U64)

    def op(name: str, value: SearchStrategy[Any]) -> SearchStrategy[pb.StreamRequest]:
        return st.builds(lambda r, v: pb.StreamRequest(request_id=r, **{name: v}), rid, value)

    opens = op("open", ids.map(lambda s: pb.OpenStream(session_id=s)))
    work = st.one_of(op("append", _INPUTS), op("query", _PROMPTS), op("generate", _PROMPTS))
    nothing = rid.map(lambda r: pb.StreamRequest(request_id=r))
    first = _mostly(opens, st.one_of(work, nothing))  # appends before the open
    later = _mostly(work, st.one_of(opens, nothing))  # opens twice, ops that set nothing
    streams = st.tuples(first, st.lists(later, max_size=4)).map(lambda p: (p[0], *p[1]))
    return _mostly(streams, st.just(()), odds=12)


def _import_requests(export: bytes) -> SearchStrategy[tuple[tuple[Message, ...], str]]:
    header = _NAMES.map(lambda n: pb.ImportSessionRequest(header=pb.ImportHeader(name=n)))
    payloads = st.one_of(
        st.one_of(CHECKPOINT_MUTATIONS, STATE_EDITS).map(
            lambda m: (m.apply(export), f"the export after {m!r}")
        ),
        st.just((export, "the valid export")),
        st.just((export + export, "the valid export twice")),
        st.binary(max_size=256).map(lambda b: (b, "")),
    )

    def chunked(payload: tuple[bytes, str], cuts: list[int]) -> tuple[list[Message], str]:
        data, note = payload
        edges = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
        parts = [data[a:b] for a, b in itertools.pairwise(edges)] or [b""]
        return [pb.ImportSessionRequest(data=part) for part in parts], note

    data = st.builds(chunked, payloads, st.lists(st.integers(0, 2**32), max_size=4))
    oversized = st.just(([pb.ImportSessionRequest(data=b"\x00" * (5 << 20))], "an oversized chunk"))
    return _mostly(
        st.builds(lambda h, d: ((h, *d[0]), d[1]), header, data),
        st.one_of(
            data.map(lambda d: (tuple(d[0]), d[1])),  # no header
            st.builds(lambda h, d: ((h, h, *d[0]), d[1]), header, data),
            st.builds(lambda h, d: ((h, *d[0], h), d[1]), header, data),
            st.builds(lambda h, d: ((h, *d[0]), d[1]), header, oversized),
            header.map(lambda h: ((h,), "")),
        ),
    )


def _one(messages: SearchStrategy[Message]) -> SearchStrategy[tuple[tuple[Message, ...], str]]:
    return messages.map(lambda message: ((message,), ""))


def _request_strategies(targets: Targets) -> dict[str, SearchStrategy[tuple[tuple[Any, ...], str]]]:
    ids = _session_ids(targets.session_ids)
    chunk_bytes = st.one_of(
        st.just(0),
        # Not below 1 KiB: a 1-byte chunking of an export is valid and slow (one message a byte).
        st.integers(1024, 2**32 - 1),
        st.sampled_from([1024, (256 << 10) - 1024, 256 << 10, (4 << 20) - 1024, 2**31, 2**32 - 1]),
    )
    return {
        "MemoryService/CreateSession": _one(_message(pb.CreateSessionRequest, name=_NAMES)),
        "MemoryService/GetSession": _one(_message(pb.GetSessionRequest, session_id=ids)),
        "MemoryService/ListSessions": _one(st.just(pb.ListSessionsRequest())),
        "MemoryService/DeleteSession": _one(_message(pb.DeleteSessionRequest, session_id=ids)),
        "MemoryService/Append": _one(
            _message(pb.AppendRequest, session_id=ids, input=_mostly(_INPUTS, st.none(), odds=12))
        ),
        "MemoryService/Query": _one(
            _message(pb.QueryRequest, session_id=ids, prompt=_mostly(_PROMPTS, st.none(), odds=12))
        ),
        "MemoryService/Stream": _stream_requests(ids).map(lambda requests: (requests, "")),
        "MemoryService/Generate": _one(
            _message(
                pb.GenerateRequest, session_id=ids, prompt=_mostly(_PROMPTS, st.none(), odds=12)
            )
        ),
        "MemoryService/Checkpoint": _one(_message(pb.CheckpointRequest, session_id=ids)),
        "MemoryService/ExportSession": _one(
            _message(pb.ExportSessionRequest, session_id=ids, chunk_bytes=chunk_bytes)
        ),
        "MemoryService/ImportSession": _import_requests(targets.export),
        "MemoryService/ForkSession": _one(
            _message(pb.ForkSessionRequest, session_id=ids, name=_NAMES)
        ),
        "AdminService/ListResident": _one(st.just(pb.ListResidentRequest())),
        "AdminService/EvictSession": _one(
            _message(pb.EvictSessionRequest, session_id=ids, tier=_TIERS)
        ),
        "AdminService/GetStats": _one(st.just(pb.GetStatsRequest())),
        "AdminService/ListEvents": _one(
            _message(
                pb.ListEventsRequest,
                tenant_id=st.none() | _TEXT,
                kind=_EVENT_KINDS,
                session_id=st.none() | ids,
                limit=_mostly(st.integers(0, 1001), _U32),
            )
        ),
    }


# Bodies no decoder of the RPC's message takes, or one takes with surprise.
_GARBAGE = st.one_of(
    st.binary(min_size=1, max_size=64),
    st.sampled_from(
        [
            b"\x0a\x02\xff\xfe",  # field 1 as a length-delimited string of malformed UTF-8
            b"\x08",  # a varint cut short
            b"\x08" + b"\xff" * 10 + b"\x01",  # a varint longer than 64 bits
            b"\x0a\xff\xff\xff\xff\x0f",  # a length past the end
            b"\x0b",  # a group that never ends
            b"\x0c",  # a group end without a start
            b"\x00",  # field number 0
            b"\xfa\xff\xff\xff\x0f\x00",  # the largest field number
            b"\x12\x02\x12\x00" * 8,  # nested field 2, over and over
            b"\x12" + b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",  # a length of 2**63
        ]
    ),
    st.just(b"\xff" * (5 << 20)),
)


def _undecodable(messages: SearchStrategy[tuple[tuple[Any, ...], str]]) -> Any:
    """The requests serialized, then one of them damaged or replaced by garbage."""

    def corrupt(
        requests: tuple[tuple[Message, ...], str], which: int, how: Mutations | bytes
    ) -> tuple[tuple[bytes, ...], str]:
        bodies = [message.SerializeToString() for message in requests[0]] or [b""]
        i = which % len(bodies)
        bodies[i] = how if isinstance(how, bytes) else how.apply(bodies[i])
        note = "" if isinstance(how, bytes) else f"request {i} after {how!r}"
        return tuple(bodies), note

    return st.builds(corrupt, messages, st.integers(0, 7), st.one_of(FILE_MUTATIONS, _GARBAGE))


def call_strategies(targets: Targets) -> dict[str, SearchStrategy[FuzzCall]]:
    """A strategy of calls for every group of GROUPS (an RPC, or an RPC with ``:raw`` bodies)."""
    tenant = _credentials(targets.api_key, targets.admin_key, "tenant key", "admin key")
    admin = _credentials(targets.admin_key, targets.api_key, "admin key", "tenant key")
    calls = {}
    for rpc, requests in _request_strategies(targets).items():
        credentials = admin if rpc.startswith("AdminService/") else tenant
        for group, made in ((rpc, requests), (f"{rpc}:raw", _undecodable(requests))):
            calls[group] = st.builds(
                lambda made, credentials, deadline, rpc=rpc: FuzzCall(
                    rpc, tuple(made[0]), credentials, deadline, made[1]
                ),
                made,
                credentials,
                _DEADLINES,
            )
    return calls


def regression_calls(targets: Targets) -> dict[str, list[FuzzCall]]:
    """Calls a group always sends before the generated ones (hypothesis's explicit
    examples): the hostile inputs that once got an unclean answer, kept as regressions."""
    tenant = Credentials("tenant key", bearer(targets.api_key))
    admin = Credentials("admin key", bearer(targets.admin_key))
    live = targets.session_ids[0]
    subnormal = pb.Prompt(
        input=pb.Input(text=b"?"),
        params=pb.SamplingParams(temperature=1e-45, max_new_tokens=1),
    )
    opened = pb.StreamRequest(open=pb.OpenStream(session_id=live))
    header = pb.ImportSessionRequest(header=pb.ImportHeader(name="regression"))

    def imported(mutation: Mutations) -> FuzzCall:
        data = pb.ImportSessionRequest(data=mutation.apply(targets.export))
        note = f"the export after {mutation!r}"
        return FuzzCall("MemoryService/ImportSession", (header, data), tenant, note=note)

    calls = {
        "MemoryService/Query": [
            unsigned_call("MemoryService/Query", pb.QueryRequest(session_id=live, prompt=subnormal))
        ],
        "MemoryService/Generate": [
            unsigned_call(
                "MemoryService/Generate", pb.GenerateRequest(session_id=live, prompt=subnormal)
            )
        ],
        "MemoryService/Stream": [
            unsigned_call(
                "MemoryService/Stream", opened, pb.StreamRequest(request_id=1, query=subnormal)
            )
        ],
        "AdminService/EvictSession": [
            unsigned_call(
                "AdminService/EvictSession", pb.EvictSessionRequest(session_id=live, tier=99)
            )
        ],
        # NUL characters: PostgreSQL refuses them in text (DataError, once INTERNAL).
        "MemoryService/CreateSession": [
            unsigned_call("MemoryService/CreateSession", pb.CreateSessionRequest(name="a\x00b"))
        ],
        "MemoryService/ForkSession": [
            unsigned_call(
                "MemoryService/ForkSession", pb.ForkSessionRequest(session_id=live, name="\x00")
            )
        ],
        "MemoryService/DeleteSession": [
            unsigned_call(
                "MemoryService/DeleteSession", pb.DeleteSessionRequest(session_id="\x00" * 36)
            )
        ],
        "MemoryService/GetSession": [
            unsigned_call("MemoryService/GetSession", pb.GetSessionRequest(session_id="a\x00b"))
        ],
        "MemoryService/ImportSession": [
            imported(m) for m in (*CHECKPOINT_REGRESSIONS, *STATE_REGRESSIONS)
        ],
    }
    credentials = {"MemoryService": tenant, "AdminService": admin}
    for group, listed in calls.items():
        calls[group] = [replace(c, credentials=credentials[c.rpc.split("/")[0]]) for c in listed]
    for rpc in METHODS:
        # Wire type 7 does not exist: no message decodes from these bytes.
        garbage = FuzzCall(rpc, (b"\xff\xff\xff",), credentials[rpc.split("/")[0]])
        calls[f"{rpc}:raw"] = [garbage]
    return calls
