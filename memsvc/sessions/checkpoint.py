"""Checkpoint files: a session's state tensors plus a header, in safetensors, written crash-safely.

The header lives in the safetensors metadata (strings): format version, model
hash, config hash, stream position, WAL offset, and a checksum. The checksum is
a SHA-256 over the other header fields and every tensor's name, dtype, shape
and bytes, so a flipped bit anywhere that matters (a position digit included)
is caught; a cut-off file fails to parse. Either way reading raises
CorruptCheckpointError, and restore falls back to the previous checkpoint
(``newest_valid_checkpoint``).

A file is written to a temporary name in its directory, fsynced, renamed into
place and the directory fsynced (``memsvc.store.durable_files``); only then may
its SQL row be committed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import safetensors.torch
import structlog
import torch

from memsvc.store.durable_files import fsync_directory, remove_temporaries, write_atomically

log = structlog.get_logger(__name__)

FORMAT_VERSION = 1
_KEY_PREFIX = "memsvc."
_CHECKSUM_ALGORITHM = "sha256"
_HEADER_LENGTH_BYTES = 8  # safetensors: u64 little-endian length of the JSON header
# As long as every checksum, so the header keeps its length when the real one replaces it.
_CHECKSUM_PLACEHOLDER = f"{_CHECKSUM_ALGORITHM}:{'0' * hashlib.sha256().digest_size * 2}"
PARALLEL_HASH_BYTES = 1 << 20
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class CheckpointError(Exception):
    """Base class: the file cannot be used to restore a session.

    Attributes:
        path: the file.
        reason: what is wrong, in a few words.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class CorruptCheckpointError(CheckpointError):
    """The file is truncated, unparsable, of an unknown format version, or fails its checksum."""


class UnsupportedCheckpointVersionError(CorruptCheckpointError):
    """The file declares a format version this build does not read (a newer or foreign file)."""


class CheckpointMismatchError(CheckpointError):
    """The file is sound but was written for another model or configuration."""


@dataclass(frozen=True)
class CheckpointHeader:
    """What a checkpoint says about itself. ``checksum`` is ``"sha256:<hex>"``."""

    format_version: int
    model_hash: str
    config_hash: str
    position: int
    wal_offset: int
    checksum: str


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read back and verified."""

    path: Path
    header: CheckpointHeader
    tensors: dict[str, torch.Tensor]


@dataclass(frozen=True)
class WrittenCheckpoint:
    """A checkpoint durable on disk: what its SQL row records."""

    path: Path
    header: CheckpointHeader
    size_bytes: int


def _fields(
    format_version: int, model_hash: str, config_hash: str, position: int, wal_offset: int
) -> dict[str, str]:
    return {
        "format_version": str(format_version),
        "model_hash": model_hash,
        "config_hash": config_hash,
        "position": str(position),
        "wal_offset": str(wal_offset),
    }


def _raw_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A byte view of a contiguous tensor of any dtype (bfloat16 has no numpy twin; 0-d
    tensors need the reshape)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


def _checksum(fields: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(fields.items())).encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(_raw_bytes(tensor))
    return f"{_CHECKSUM_ALGORITHM}:{digest.hexdigest()}"


def _on_cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}


def _metadata_of(fields: Mapping[str, str], checksum: str) -> dict[str, str]:
    metadata = {_KEY_PREFIX + key: value for key, value in fields.items()}
    metadata[_KEY_PREFIX + "checksum"] = checksum
    return metadata


def _safetensors_header(cpu: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """The length prefix and JSON header of a safetensors file whose data follows in ``cpu``'s
    order (any order the offsets describe is valid), padded to 8 bytes as safetensors pads."""
    entries: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name, tensor in cpu.items():
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {tensor.dtype} has no safetensors name here")
        size = tensor.numel() * tensor.element_size()
        entries[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(_HEADER_LENGTH_BYTES, "little") + header


def _sorted_header(data: bytes) -> bytes:
    """``data``, a safetensors file, with the keys of its JSON header sorted.

    The library writes the metadata from a hash map, in an order that changes from
    call to call, so two exports of one state differed byte for byte. The offsets and
    the tensor bytes are untouched: only the header's text (and its padding) changes.
    """
    length = int.from_bytes(data[:_HEADER_LENGTH_BYTES], "little")
    header = json.loads(data[_HEADER_LENGTH_BYTES : _HEADER_LENGTH_BYTES + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    body = data[_HEADER_LENGTH_BYTES + length :]
    return len(text).to_bytes(_HEADER_LENGTH_BYTES, "little") + text + body


def encode_checkpoint(
    tensors: Mapping[str, torch.Tensor],
    *,
    model_hash: str,
    config_hash: str,
    position: int,
    wal_offset: int,
) -> tuple[bytes, CheckpointHeader]:
    """The bytes of a checkpoint file holding ``tensors`` (moved to CPU), and its header.

    Session exports are these bytes too (``memsvc.sessions.portable``): the same state
    gives the same bytes, the header's keys sorted.
    """
    cpu = _on_cpu(tensors)
    fields = _fields(FORMAT_VERSION, model_hash, config_hash, position, wal_offset)
    checksum = _checksum(fields, cpu)
    header = CheckpointHeader(
        FORMAT_VERSION, model_hash, config_hash, position, wal_offset, checksum
    )
    data = safetensors.torch.save(cpu, metadata=_metadata_of(fields, checksum))
    return _sorted_header(data), header


def write_checkpoint(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    model_hash: str,
    config_hash: str,
    position: int,
    wal_offset: int,
) -> WrittenCheckpoint:
    """Writes ``tensors`` (moved to CPU) and the header to ``path`` atomically and durably.

    The file is the one ``encode_checkpoint`` (the safetensors library)
    describes, and a test holds the two equal; but the tensors go to the file
    straight from their memory, with no serialised copy, while another thread
    computes the checksum (hashing releases the GIL). The header goes out with
    a placeholder of the checksum's length, patched before the fsync. For a
    large state the copy and the hash each cost about what the write does; a
    small one (under PARALLEL_HASH_BYTES) is hashed first, as a second thread
    would cost more than it saves.
    """
    path = Path(path)
    cpu = _on_cpu(tensors)
    fields = _fields(FORMAT_VERSION, model_hash, config_hash, position, wal_offset)
    head = _safetensors_header(cpu, _metadata_of(fields, _CHECKSUM_PLACEHOLDER))
    at = head.index(_CHECKSUM_PLACEHOLDER.encode())

    def write(file: BinaryIO, checksum: Callable[[], str]) -> None:
        file.write(head)
        for tensor in cpu.values():
            file.write(_raw_bytes(tensor))
        file.seek(at)
        file.write(checksum().encode())
        file.seek(0, os.SEEK_END)

    if sum(t.numel() * t.element_size() for t in cpu.values()) < PARALLEL_HASH_BYTES:
        checksum = _checksum(fields, cpu)
        size = write_atomically(path, lambda file: write(file, lambda: checksum))
    else:
        with ThreadPoolExecutor(1, thread_name_prefix="memsvc-checksum") as pool:
            hashing = pool.submit(_checksum, fields, cpu)
            size = write_atomically(path, lambda file: write(file, hashing.result))
        checksum = hashing.result()
    header = CheckpointHeader(
        FORMAT_VERSION, model_hash, config_hash, position, wal_offset, checksum
    )
    return WrittenCheckpoint(path, header, size)


def _metadata(path: Path, data: bytes) -> dict[str, str]:
    if len(data) < _HEADER_LENGTH_BYTES:
        raise CorruptCheckpointError(path, f"{len(data)} bytes, too short for a safetensors file")
    length = int.from_bytes(data[:_HEADER_LENGTH_BYTES], "little")
    if length > len(data) - _HEADER_LENGTH_BYTES:
        raise CorruptCheckpointError(path, "truncated: the safetensors header runs past the end")
    try:
        header = json.loads(data[_HEADER_LENGTH_BYTES : _HEADER_LENGTH_BYTES + length])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        # RecursionError: JSON nested deeper than the interpreter's recursion limit.
        raise CorruptCheckpointError(path, f"unparsable safetensors header ({error})") from error
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise CorruptCheckpointError(path, "no metadata: not a memsvc checkpoint")
    if not all(isinstance(value, str) for value in metadata.values()):
        raise CorruptCheckpointError(path, "metadata values must be strings")
    return {
        key.removeprefix(_KEY_PREFIX): value
        for key, value in metadata.items()
        if key.startswith(_KEY_PREFIX)
    }


def _header(path: Path, meta: Mapping[str, str]) -> CheckpointHeader:
    version = meta.get("format_version")
    if version != str(FORMAT_VERSION):
        raise UnsupportedCheckpointVersionError(
            path, f"format version {version!r}, this build reads version {FORMAT_VERSION}"
        )
    try:
        return CheckpointHeader(
            format_version=FORMAT_VERSION,
            model_hash=meta["model_hash"],
            config_hash=meta["config_hash"],
            position=int(meta["position"]),
            wal_offset=int(meta["wal_offset"]),
            checksum=meta["checksum"],
        )
    except (KeyError, ValueError) as error:
        raise CorruptCheckpointError(path, f"bad header field ({error!r})") from error


def read_checkpoint(
    path: Path, *, model_hash: str | None = None, config_hash: str | None = None
) -> Checkpoint:
    """Reads and verifies a checkpoint; given hashes must match the header's.

    Raises CorruptCheckpointError (truncated, unparsable, unknown format
    version, checksum mismatch), CheckpointMismatchError (other model or
    config), OSError (unreadable, e.g. FileNotFoundError).
    """
    path = Path(path)
    return decode_checkpoint(
        path.read_bytes(), source=path, model_hash=model_hash, config_hash=config_hash
    )


def decode_checkpoint(
    data: bytes, *, source: Path, model_hash: str | None = None, config_hash: str | None = None
) -> Checkpoint:
    """Verifies a checkpoint file's bytes; ``source`` names them in errors (see read_checkpoint)."""
    header = _header(source, _metadata(source, data))
    try:
        tensors = safetensors.torch.load(data)
    except Exception as error:  # safetensors raises its own SafetensorError and others
        raise CorruptCheckpointError(source, f"unreadable tensors ({error})") from error
    fields = _fields(
        header.format_version,
        header.model_hash,
        header.config_hash,
        header.position,
        header.wal_offset,
    )
    if _checksum(fields, tensors) != header.checksum:
        raise CorruptCheckpointError(source, "checksum mismatch")
    for name, expected, found in (
        ("model hash", model_hash, header.model_hash),
        ("config hash", config_hash, header.config_hash),
    ):
        if expected is not None and expected != found:
            raise CheckpointMismatchError(source, f"{name} {found!r}, expected {expected!r}")
    return Checkpoint(source, header, tensors)


def newest_valid_checkpoint(
    candidates: Iterable[Path],
    *,
    model_hash: str | None = None,
    config_hash: str | None = None,
    on_rejected: Callable[[Path, CheckpointError | OSError], None] | None = None,
) -> Checkpoint | None:
    """The first of ``candidates`` (give them newest first) that reads and verifies, or None.

    Each rejected file is logged (``checkpoint_rejected``) and passed to
    ``on_rejected``, for instance to record a corruption event.
    """
    for path in candidates:
        try:
            return read_checkpoint(path, model_hash=model_hash, config_hash=config_hash)
        except (CheckpointError, OSError) as error:
            reason = error.reason if isinstance(error, CheckpointError) else repr(error)
            log.warning(
                "checkpoint_rejected", path=str(path), error=type(error).__name__, reason=reason
            )
            if on_rejected is not None:
                on_rejected(Path(path), error)
    return None


class CheckpointDirectory:
    """One session's checkpoint files, ``ckpt-<sequence>.safetensors``, in one directory.

    One writer at a time (the lease holder); readers may run beside it.
    """

    _NAME = re.compile(r"ckpt-(\d{12})\.safetensors")

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path_for(self, sequence: int) -> Path:
        """Where checkpoint ``sequence`` is (or will be) stored."""
        if sequence < 0:
            raise ValueError(f"sequence must be non-negative, got {sequence}")
        return self.directory / f"ckpt-{sequence:012d}.safetensors"

    def sequences(self) -> list[int]:
        """The checkpoint numbers on disk, newest first."""
        if not self.directory.is_dir():
            return []
        found = (self._NAME.fullmatch(entry.name) for entry in self.directory.iterdir())
        return sorted((int(match.group(1)) for match in found if match), reverse=True)

    def write(
        self,
        sequence: int,
        tensors: Mapping[str, torch.Tensor],
        *,
        model_hash: str,
        config_hash: str,
        position: int,
        wal_offset: int,
    ) -> WrittenCheckpoint:
        """Writes checkpoint ``sequence`` (see write_checkpoint); creates the directory durably."""
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True, exist_ok=True)
            fsync_directory(self.directory.parent)
        return write_checkpoint(
            self.path_for(sequence),
            tensors,
            model_hash=model_hash,
            config_hash=config_hash,
            position=position,
            wal_offset=wal_offset,
        )

    def newest_valid(
        self,
        *,
        model_hash: str | None = None,
        config_hash: str | None = None,
        on_rejected: Callable[[Path, CheckpointError | OSError], None] | None = None,
    ) -> Checkpoint | None:
        """The newest checkpoint on disk that verifies (see newest_valid_checkpoint)."""
        return newest_valid_checkpoint(
            (self.path_for(sequence) for sequence in self.sequences()),
            model_hash=model_hash,
            config_hash=config_hash,
            on_rejected=on_rejected,
        )

    def remove_temporaries(self) -> list[Path]:
        """Deletes temporaries left by interrupted writes; call only while no write runs."""
        if not self.directory.is_dir():
            return []
        return remove_temporaries(self.directory)
