"""Bad input, generated: every RPC's requests and the session files, made adversarial.

Three kinds of pieces, shared by the test suite and `memsvc bench reliability`:

* Request strategies (``call_strategies``): for each RPC of MemoryService and
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
* ``run_bad_input_campaign``: sends N generated calls per RPC to a running
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

import contextlib
import itertools
import json
import math
import string
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import grpc
import torch
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, Verbosity, example, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from memsvc.model.tokenizer import VOCAB_SIZE
from memsvc.proto.v1 import memsvc_pb2 as pb
from memsvc.proto.v1 import memsvc_pb2_grpc as pb_grpc
from memsvc.sessions.checkpoint import CheckpointError, decode_checkpoint, encode_checkpoint

Code = grpc.StatusCode

# What a bad request may be answered with: each code names the caller's mistake
# (memsvc.proto's error table). UNKNOWN and INTERNAL are bugs; ABORTED (a
# quarantined session), UNAVAILABLE (a dying server) and DEADLINE_EXCEEDED (a
# hang, unless the call set a short deadline of its own) are damage.
CLEAN_CODES: frozenset[Code] = frozenset(
    {
        Code.OK,
        Code.INVALID_ARGUMENT,
        Code.NOT_FOUND,
        Code.RESOURCE_EXHAUSTED,
        Code.FAILED_PRECONDITION,
        Code.UNAUTHENTICATED,
        Code.PERMISSION_DENIED,
    }
)
# A call without a deadline of its own gets this long before it counts as a hang.
HANG_S = 60.0
# The campaign's own channel sends and receives whatever the server allows.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
]
_SENTINEL_TEXT = b"The sentinel: no generated request names this session. " * 4
_TARGET_TEXT = b"The target: generated requests append to it, fork it, evict it. " * 4
_SENTINEL_CHANGED = "the sentinel session changed"
_CREATORS = (
    "MemoryService/CreateSession",
    "MemoryService/ImportSession",
    "MemoryService/ForkSession",
)


# ---- the RPCs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One RPC as a generic channel call sees it."""

    path: str  # "/memsvc.v1.MemoryService/Append"
    request: type[Message]
    response: type[Message]
    client_streaming: bool
    server_streaming: bool

    def multi_callable(self, channel: grpc.Channel, raw: bool) -> Callable[..., Any]:
        """The channel's multi-callable; ``raw`` sends each request as the bytes it is."""
        kind = f"{'stream' if self.client_streaming else 'unary'}_" + (
            "stream" if self.server_streaming else "unary"
        )
        serialize = None if raw else self.request.SerializeToString
        return getattr(channel, kind)(
            self.path, request_serializer=serialize, response_deserializer=self.response.FromString
        )


METHODS: dict[str, Method] = {
    f"{service.name}/{method.name}": Method(
        f"/{service.full_name}/{method.name}",
        getattr(pb, method.input_type.name),
        getattr(pb, method.output_type.name),
        method.client_streaming,
        method.server_streaming,
    )
    for service in pb.DESCRIPTOR.services_by_name.values()
    for method in service.methods
}
# Every RPC, then every RPC with undecodable bodies.
GROUPS: tuple[str, ...] = (*METHODS, *(f"{rpc}:raw" for rpc in METHODS))


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    """The metadata that authenticates a call with ``key``."""
    return (("authorization", f"Bearer {key}"),)


def _pretty_as_repr(self: Any, printer: Any, cycle: bool) -> None:
    """Hypothesis prints a dataclass field by field; these print as their (short) repr."""
    printer.text(repr(self))


class Credentials(NamedTuple):
    """Call metadata, and what it is in words (reports never show a real key)."""

    label: str
    metadata: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class FuzzCall:
    """One generated call: its RPC, its requests (messages, or bytes sent undecoded), its
    credentials and deadline, and how its requests were made where their bytes do not say."""

    rpc: str  # a key of METHODS
    requests: tuple[Message | bytes, ...]  # exactly one for a unary request
    credentials: Credentials
    deadline_s: float | None = None  # a deadline of its own; None: the campaign's hang limit
    note: str = ""

    @property
    def raw(self) -> bool:
        return any(isinstance(request, bytes) for request in self.requests)

    def allowed(self, clean: frozenset[Code] = CLEAN_CODES) -> frozenset[Code]:
        """The answers that are not failures: a call with a deadline of its own may miss it."""
        return clean | {Code.DEADLINE_EXCEEDED} if self.deadline_s is not None else clean

    def __repr__(self) -> str:
        parts = [describe(request) for request in self.requests]
        parts.append(f"credentials={self.credentials.label}")
        if self.deadline_s is not None:
            parts.append(f"deadline_s={self.deadline_s}")
        if self.note:
            parts.append(f"note={self.note}")
        return f"{self.rpc}({', '.join(parts)})"

    _repr_pretty_ = _pretty_as_repr


@dataclass(frozen=True)
class Outcome:
    code: Code
    details: str
    responses: tuple[Message, ...]

    @property
    def created(self) -> str | None:
        """The id of the session this answer says was created, if any."""
        last = self.responses[-1] if self.responses else None
        return last.session_id if isinstance(last, pb.Session) and last.session_id else None


def send(channel: grpc.Channel, call: FuzzCall, hang_s: float = HANG_S) -> Outcome:
    """Sends the call and reads every response; the status it ended with."""
    method = METHODS[call.rpc]
    invoke = method.multi_callable(channel, call.raw)
    request = iter(call.requests) if method.client_streaming else call.requests[0]
    timeout = call.deadline_s if call.deadline_s is not None else hang_s
    try:
        answer = invoke(request, metadata=call.credentials.metadata, timeout=timeout)
        responses = tuple(answer) if method.server_streaming else (answer,)
    except grpc.RpcError as error:
        return Outcome(error.code(), error.details() or "", ())
    return Outcome(Code.OK, "", responses)


def describe(value: Message | bytes) -> str:
    """A request as Python-ish text, long values shortened so that they can be rebuilt."""
    if isinstance(value, bytes):
        return _short(value)
    fields = []
    for descriptor, item in value.ListFields():
        if descriptor.message_type is not None and not descriptor.is_repeated:
            fields.append(f"{descriptor.name}={describe(item)}")
        else:
            fields.append(f"{descriptor.name}={_short(item)}")
    return f"{type(value).__name__}({', '.join(fields)})"


def _short(value: Any, keep: int = 48) -> str:
    """``repr`` of a field, a long one as runs (``b'[' * 9 + b']' * 9``) or cut."""
    if isinstance(value, bytes | str):
        if len(value) <= keep:
            return repr(value)
        runs = [(key, len(list(group))) for key, group in itertools.groupby(value)]
        if len(runs) <= 4:
            unit = (lambda c: bytes([c])) if isinstance(value, bytes) else (lambda c: c)
            return " + ".join(f"{unit(c)!r} * {n}" if n > 1 else repr(unit(c)) for c, n in runs)
        return f"{value[:keep]!r}...({len(value)} long)"
    if isinstance(value, Iterable) and not isinstance(value, Message):
        items = list(value)
        if len(items) > 8 and all(item == items[0] for item in items):
            return f"[{_short(items[0])}] * {len(items)}"
        shown = ", ".join(describe(i) if isinstance(i, Message) else _short(i) for i in items[:16])
        return f"[{shown}]" if len(items) <= 16 else f"[{shown}, ...({len(items)} items)]"
    return repr(value)


# ---- file mutations --------------------------------------------------------------------


class Mutation(Protocol):
    def apply(self, data: bytes) -> bytes: ...


@dataclass(frozen=True)
class BitFlip:
    at: int  # taken modulo the length
    bit: int

    def apply(self, data: bytes) -> bytes:
        if not data:
            return data
        i = self.at % len(data)
        return data[:i] + bytes([data[i] ^ (1 << self.bit)]) + data[i + 1 :]


@dataclass(frozen=True)
class Truncate:
    keep: int  # taken modulo the length plus one

    def apply(self, data: bytes) -> bytes:
        return data[: self.keep % (len(data) + 1)]


@dataclass(frozen=True)
class Insert:
    at: int
    chunk: bytes

    def apply(self, data: bytes) -> bytes:
        i = self.at % (len(data) + 1)
        return data[:i] + self.chunk + data[i:]


@dataclass(frozen=True)
class Overwrite:
    at: int
    chunk: bytes

    def apply(self, data: bytes) -> bytes:
        i = self.at % (len(data) + 1)
        return data[:i] + self.chunk + data[i + len(self.chunk) :]


@dataclass(frozen=True)
class Delete:
    at: int
    length: int

    def apply(self, data: bytes) -> bytes:
        i = self.at % (len(data) + 1)
        return data[:i] + data[i + self.length :]


_HEADER_LENGTH = 8  # safetensors: u64 little-endian length of the JSON header


def _split_safetensors(data: bytes) -> tuple[Any, bytes] | None:
    """A safetensors file's JSON header (parsed) and the bytes after it; None if unparsable."""
    length = int.from_bytes(data[:_HEADER_LENGTH], "little")
    if len(data) < _HEADER_LENGTH or length > len(data) - _HEADER_LENGTH:
        return None
    try:
        header = json.loads(data[_HEADER_LENGTH : _HEADER_LENGTH + length])
    except (ValueError, RecursionError):
        return None
    return header, data[_HEADER_LENGTH + length :]


def _join_safetensors(header: bytes, body: bytes) -> bytes:
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(_HEADER_LENGTH, "little") + header + body


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


@dataclass(frozen=True, repr=False)
class HeaderEdit:
    """Sets one field of a safetensors header to ``value``, the file's framing kept valid:
    a ``memsvc.*`` key sets that metadata field, any other key the field of tensor entry
    number ``entry``. A file whose header does not parse is left as it is."""

    key: str
    entry: int
    value: Any

    def apply(self, data: bytes) -> bytes:
        split = _split_safetensors(data)
        if split is None or not isinstance(split[0], dict):
            return data
        header, body = split
        if self.key.startswith("memsvc."):
            target = header.setdefault("__metadata__", {})
        else:
            names = sorted(name for name in header if name != "__metadata__")
            target = header[names[self.entry % len(names)]] if names else header
        if not isinstance(target, dict):
            return data
        target[self.key] = self.value
        return _join_safetensors(_json_bytes(header), body)

    def __repr__(self) -> str:
        value = _short(self.value) if isinstance(self.value, str) else repr(self.value)
        return f"HeaderEdit(key={self.key!r}, entry={self.entry}, value={value})"


@dataclass(frozen=True)
class HeaderReplace:
    """Replaces a safetensors header with ``raw`` bytes, length prefix and data kept valid."""

    raw: bytes

    def apply(self, data: bytes) -> bytes:
        split = _split_safetensors(data)
        return data if split is None else _join_safetensors(self.raw, split[1])

    def __repr__(self) -> str:
        return f"HeaderReplace(raw={_short(self.raw)})"

    _repr_pretty_ = _pretty_as_repr


@dataclass(frozen=True)
class StateEdit:
    """Re-encodes a checkpoint's tensors with one of them changed, under a valid checksum:
    a file a client crafted, not one the disk damaged. ``tensor`` picks a tensor (sorted
    names, modulo; for "counter", among the integer ones); ``value`` is the new position or
    counter, or picks an element or an axis."""

    change: str  # "position", "counter", or a key of STATE_CHANGES
    tensor: int
    value: int

    def apply(self, data: bytes) -> bytes:
        try:
            checkpoint = decode_checkpoint(data, source=Path("<fuzz>"))
        except CheckpointError:
            return data
        tensors = dict(checkpoint.tensors)
        names = sorted(tensors)
        name = names[self.tensor % len(names)]
        position = checkpoint.header.position
        if self.change == "position":
            position = self.value
            tensors["position"] = torch.full_like(tensors["position"], self.value)
        elif self.change == "counter":
            counters = [n for n in names if not tensors[n].is_floating_point()]
            name = counters[self.tensor % len(counters)]
            tensors[name] = torch.full_like(tensors[name], self.value)
        else:
            edited = STATE_CHANGES[self.change](tensors[name], self.value)
            if edited is None:
                del tensors[name]
            elif self.change == "add":
                tensors[f"{name}.extra"] = edited
            else:
                tensors[name] = edited
        encoded, _ = encode_checkpoint(
            tensors,
            model_hash=checkpoint.header.model_hash,
            config_hash=checkpoint.header.config_hash,
            position=position,
            wal_offset=checkpoint.header.wal_offset,
        )
        return encoded


def _poison(fill: float) -> Callable[[torch.Tensor, int], torch.Tensor]:
    def change(tensor: torch.Tensor, value: int) -> torch.Tensor:
        if not tensor.is_floating_point() or tensor.numel() == 0:
            return tensor
        poisoned = tensor.clone()
        poisoned.view(-1)[value % tensor.numel()] = fill
        return poisoned

    return change


def _recast(tensor: torch.Tensor, value: int) -> torch.Tensor:
    others = [torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.uint8]
    return tensor.to([d for d in others if d != tensor.dtype][value % (len(others) - 1)])


def _resize(grow: bool) -> Callable[[torch.Tensor, int], torch.Tensor]:
    def change(tensor: torch.Tensor, value: int) -> torch.Tensor:
        if tensor.ndim == 0:
            return tensor.reshape(1)
        axis = value % tensor.ndim
        if grow:
            shape = list(tensor.shape)
            shape[axis] = 1
            return torch.cat([tensor, torch.zeros(shape, dtype=tensor.dtype)], dim=axis)
        return tensor.narrow(axis, 0, max(tensor.shape[axis] - 1, 0)).contiguous()

    return change


STATE_CHANGES: dict[str, Callable[[torch.Tensor, int], torch.Tensor | None]] = {
    "nan": _poison(math.nan),
    "inf": _poison(math.inf),
    "dtype": _recast,
    "grow": _resize(grow=True),
    "shrink": _resize(grow=False),
    "scalar": lambda tensor, value: torch.zeros((), dtype=tensor.dtype),
    "drop": lambda tensor, value: None,
    "add": lambda tensor, value: tensor.clone(),
}


@dataclass(frozen=True)
class Mutations:
    """Mutations applied in order."""

    steps: tuple[Mutation, ...]

    def apply(self, data: bytes) -> bytes:
        for step in self.steps:
            data = step.apply(data)
        return data

    def __repr__(self) -> str:
        return " + ".join(map(repr, self.steps))

    _repr_pretty_ = _pretty_as_repr


# Offsets: near the start (file and record headers) or anywhere (modulo the length).
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
    _JSON.map(_json_bytes),
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
            _call("MemoryService/Query", pb.QueryRequest(session_id=live, prompt=subnormal))
        ],
        "MemoryService/Generate": [
            _call("MemoryService/Generate", pb.GenerateRequest(session_id=live, prompt=subnormal))
        ],
        "MemoryService/Stream": [
            _call("MemoryService/Stream", opened, pb.StreamRequest(request_id=1, query=subnormal))
        ],
        "AdminService/EvictSession": [
            _call("AdminService/EvictSession", pb.EvictSessionRequest(session_id=live, tier=99))
        ],
        # NUL characters: PostgreSQL refuses them in text (DataError, once INTERNAL).
        "MemoryService/CreateSession": [
            _call("MemoryService/CreateSession", pb.CreateSessionRequest(name="a\x00b"))
        ],
        "MemoryService/ForkSession": [
            _call("MemoryService/ForkSession", pb.ForkSessionRequest(session_id=live, name="\x00"))
        ],
        "MemoryService/DeleteSession": [
            _call("MemoryService/DeleteSession", pb.DeleteSessionRequest(session_id="\x00" * 36))
        ],
        "MemoryService/GetSession": [
            _call("MemoryService/GetSession", pb.GetSessionRequest(session_id="a\x00b"))
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


def _call(rpc: str, *requests: Message) -> FuzzCall:
    """A call without credentials yet."""
    return FuzzCall(rpc, requests, Credentials("none", ()))


# ---- checks and the campaign ---------------------------------------------------------------


def server_alive(channel: grpc.Channel, timeout_s: float = 10.0) -> bool:
    """Whether the server answers its health check with SERVING."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        answer = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
    except grpc.RpcError:
        return False
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def session_snapshot(channel: grpc.Channel, api_key: str, session_id: str) -> tuple[int, str]:
    """A session's position and the checksum of its export, which covers every tensor and
    counter of its state."""
    stub = pb_grpc.MemoryServiceStub(channel)
    position = stub.GetSession(
        pb.GetSessionRequest(session_id=session_id), metadata=bearer(api_key), timeout=HANG_S
    ).position
    export = export_session(channel, api_key, session_id)
    return position, decode_checkpoint(export, source=Path("<export>")).header.checksum


def export_session(channel: grpc.Channel, api_key: str, session_id: str) -> bytes:
    """The session's export, whole."""
    chunks = pb_grpc.MemoryServiceStub(channel).ExportSession(
        pb.ExportSessionRequest(session_id=session_id), metadata=bearer(api_key), timeout=HANG_S
    )
    return b"".join(chunk.data for chunk in chunks)


def create_session(channel: grpc.Channel, api_key: str, name: str, text: bytes) -> str:
    """A new session of the key's tenant holding ``text``."""
    stub = pb_grpc.MemoryServiceStub(channel)
    session = stub.CreateSession(
        pb.CreateSessionRequest(name=name), metadata=bearer(api_key), timeout=HANG_S
    )
    append = pb.AppendRequest(session_id=session.session_id, input=pb.Input(text=text))
    stub.Append(append, metadata=bearer(api_key), timeout=HANG_S)
    return session.session_id


def _delete_quietly(channel: grpc.Channel, api_key: str, session_id: str) -> None:
    request = pb.DeleteSessionRequest(session_id=session_id)
    with contextlib.suppress(grpc.RpcError):  # already gone
        pb_grpc.MemoryServiceStub(channel).DeleteSession(
            request, metadata=bearer(api_key), timeout=HANG_S
        )


def _exercise(channel: grpc.Channel, api_key: str, session_id: str) -> list[tuple[str, Outcome]]:
    """A session a call created, used once each way; the answers."""
    key = Credentials("tenant key", bearer(api_key))
    prompt = pb.Prompt(
        input=pb.Input(text=b"?"), params=pb.SamplingParams(temperature=0, max_new_tokens=1)
    )
    calls = [
        _call("MemoryService/Append", pb.AppendRequest(session_id=session_id, input=prompt.input)),
        _call("MemoryService/Query", pb.QueryRequest(session_id=session_id, prompt=prompt)),
        _call("MemoryService/Checkpoint", pb.CheckpointRequest(session_id=session_id)),
        _call("MemoryService/ExportSession", pb.ExportSessionRequest(session_id=session_id)),
        _call("MemoryService/DeleteSession", pb.DeleteSessionRequest(session_id=session_id)),
    ]
    return [(c.rpc, send(channel, replace(c, credentials=key))) for c in calls]


@dataclass(frozen=True)
class Failure:
    rpc: str  # the group
    code: str
    problem: str
    call: str  # repr of the FuzzCall


@dataclass
class GroupReport:
    """What one group's examples were answered with, and what went wrong."""

    group: str
    codes: Counter[str] = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)

    @property
    def examples(self) -> int:
        return sum(self.codes.values())


class BadAnswerError(AssertionError):
    """A generated call was answered badly (raised to make hypothesis shrink it)."""


def check_call(
    channel: grpc.Channel,
    targets: Targets,
    call: FuzzCall,
    clean: frozenset[Code] = CLEAN_CODES,
    hang_s: float = HANG_S,
) -> tuple[Outcome, list[str]]:
    """Sends the call; its outcome and the problems found: a status outside ``clean`` (for the
    call), a server that stopped answering, a session it created that then fails."""
    outcome = send(channel, call, hang_s)
    problems = []
    if outcome.code not in call.allowed(clean):
        problems.append(f"answered {outcome.code.name}: {outcome.details}")
    if outcome.created is not None and call.rpc in _CREATORS:
        for rpc, after in _exercise(channel, targets.api_key, outcome.created):
            if after.code not in CLEAN_CODES:
                problems.append(
                    f"the session it created answers {rpc} with {after.code.name}: {after.details}"
                )
        _delete_quietly(channel, targets.api_key, outcome.created)
    if not server_alive(channel):
        problems.append("the server stopped answering its health check")
    return outcome, problems


def fuzz_rpc(
    channel: grpc.Channel,
    targets: Targets,
    group: str,
    *,
    examples: int,
    seed: int,
    clean: frozenset[Code] = CLEAN_CODES,
    shrink: bool = False,
    hang_s: float = HANG_S,
) -> GroupReport:
    """Sends ``examples`` generated calls of ``group`` (one of GROUPS) and checks each
    (``check_call``). With ``shrink``, the first failure raises BadAnswerError after
    hypothesis has shrunk it to a minimal call; without, every failure is recorded."""
    report = GroupReport(group)
    strategies = call_strategies(targets)
    if group not in strategies:
        raise ValueError(f"no request strategy for {group}: give its RPC one in this module")
    strategy = strategies[group]

    def run_one(call: FuzzCall) -> None:
        outcome, problems = check_call(channel, targets, call, clean, hang_s)
        report.codes[outcome.code.name] += 1
        if problems:
            report.failures.append(
                Failure(group, outcome.code.name, "; ".join(problems), repr(call))
            )
            if shrink:
                raise BadAnswerError(f"{call!r}: {'; '.join(problems)}")

    run = given(strategy)(run_one)
    for call in regression_calls(targets).get(group, ()):
        run = example(call)(run)
    settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=tuple(Phase) if shrink else (Phase.explicit, Phase.generate),
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.normal if shrink else Verbosity.quiet,
        print_blob=False,
    )(hypothesis_seed(seed)(run))()
    return report


def run_bad_input_campaign(
    address: str,
    api_key: str,
    admin_key: str,
    *,
    examples: int,
    seed: int,
    groups: Sequence[str] = GROUPS,
    clean: frozenset[Code] = CLEAN_CODES,
    hang_s: float = HANG_S,
) -> dict[str, Any]:
    """Sends ``examples`` generated calls of each group (default: every RPC, and every RPC
    with undecodable bodies) to the server at ``address``, as the tenant of ``api_key``.

    Two sessions of the tenant are created first: a target that calls may name
    (remade whenever a call deleted it) and a sentinel that none names. The
    report: per group, how many calls were answered with each status; the
    failures (a status outside ``clean``, a hang, a server that stopped
    answering, a created session that then failed, the sentinel changed), each
    with the call's repr; whether the server is alive and the sentinel unchanged
    at the end; the elapsed seconds. The two sessions are deleted at the end.
    """
    started = time.perf_counter()
    reports: list[GroupReport] = []
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        sentinel = create_session(channel, api_key, "fuzz-sentinel", _SENTINEL_TEXT)
        target = create_session(channel, api_key, "fuzz-target", _TARGET_TEXT)
        try:
            before = session_snapshot(channel, api_key, sentinel)
            for number, group in enumerate(groups):
                if not _exists(channel, api_key, target):
                    target = create_session(channel, api_key, "fuzz-target", _TARGET_TEXT)
                targets = Targets(
                    api_key, admin_key, (target,), export_session(channel, api_key, target)
                )
                report = fuzz_rpc(
                    channel,
                    targets,
                    group,
                    examples=examples,
                    seed=seed + number,
                    clean=clean,
                    hang_s=hang_s,
                )
                after = session_snapshot(channel, api_key, sentinel)
                if after != before:
                    problem = f"{_SENTINEL_CHANGED}: {before} -> {after}"
                    report.failures.append(
                        Failure(group, "", problem, "(one of the group's calls)")
                    )
                    before = after
                reports.append(report)
            alive = server_alive(channel)
        finally:
            for session_id in (target, sentinel):
                _delete_quietly(channel, api_key, session_id)
    failures = [f for r in reports for f in r.failures]
    return {
        "examples": examples,
        "seed": seed,
        "elapsed_s": round(time.perf_counter() - started, 3),
        "per_rpc": {
            r.group: {"examples": r.examples, "codes": dict(r.codes), "failures": len(r.failures)}
            for r in reports
        },
        "failures": [asdict(f) for f in failures],
        "server_alive": alive,
        "sentinel_unchanged": not any(f.problem.startswith(_SENTINEL_CHANGED) for f in failures),
    }


def _exists(channel: grpc.Channel, api_key: str, session_id: str) -> bool:
    try:
        pb_grpc.MemoryServiceStub(channel).GetSession(
            pb.GetSessionRequest(session_id=session_id), metadata=bearer(api_key), timeout=HANG_S
        )
    except grpc.RpcError as error:
        if error.code() == Code.NOT_FOUND:
            return False
        raise
    return True
