"""Damage to session files: byte mutations (bit flips, truncations, insertions,
overwrites, deletions), safetensors-header edits with the framing kept valid, and state
edits re-encoded with a valid checksum (what a hostile client could send)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from memsvc.reliability.fuzz.calls import pretty_as_repr, short_repr
from memsvc.sessions.checkpoint import CheckpointError, decode_checkpoint, encode_checkpoint

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


def json_bytes(value: Any) -> bytes:
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
        return _join_safetensors(json_bytes(header), body)

    def __repr__(self) -> str:
        value = short_repr(self.value) if isinstance(self.value, str) else repr(self.value)
        return f"HeaderEdit(key={self.key!r}, entry={self.entry}, value={value})"


@dataclass(frozen=True)
class HeaderReplace:
    """Replaces a safetensors header with ``raw`` bytes, length prefix and data kept valid."""

    raw: bytes

    def apply(self, data: bytes) -> bytes:
        split = _split_safetensors(data)
        return data if split is None else _join_safetensors(self.raw, split[1])

    def __repr__(self) -> str:
        return f"HeaderReplace(raw={short_repr(self.raw)})"

    _repr_pretty_ = pretty_as_repr


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

    _repr_pretty_ = pretty_as_repr


# Offsets: near the start (file and record headers) or anywhere (modulo the length).
