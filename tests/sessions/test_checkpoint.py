"""Checkpoint files on the real filesystem: exact round trip, corruption caught, fallback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from structlog.testing import capture_logs

from memsvc.sessions.checkpoint import (
    FORMAT_VERSION,
    PARALLEL_HASH_BYTES,
    CheckpointDirectory,
    CheckpointError,
    CheckpointMismatchError,
    CorruptCheckpointError,
    decode_checkpoint,
    encode_checkpoint,
    newest_valid_checkpoint,
    read_checkpoint,
    write_checkpoint,
)
from memsvc.store.durable_files import write_atomically

MODEL, CONFIG = "sha256:model", "sha256:config"


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "layers.0.memory.w1": torch.randn(64, 128, generator=gen),
        "layers.0.memory.momentum": torch.randn(64, 128, generator=gen, dtype=torch.float64),
        "layers.0.kv": torch.randn(2, 16, 32, generator=gen).to(torch.bfloat16),
        "layers.0.buffer": torch.randint(0, 259, (17,), generator=gen),
        "write_mask": torch.rand(8, generator=gen) > 0.5,
        "surprise_ema": torch.tensor(0.125),
        "empty": torch.empty(0, 4),
    }


def _write(path: Path, seed: int = 0, position: int = 4096, wal_offset: int = 777):
    return write_checkpoint(
        path,
        _state(seed),
        model_hash=MODEL,
        config_hash=CONFIG,
        position=position,
        wal_offset=wal_offset,
    )


def _assert_exact(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert found.keys() == expected.keys()
    for name, tensor in expected.items():
        assert found[name].dtype == tensor.dtype, name
        assert found[name].shape == tensor.shape, name
        assert torch.equal(found[name], tensor), name


def test_round_trip_is_exact(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.safetensors"
    written = _write(path, position=2_000_000_000_001, wal_offset=123_456_789)
    assert written.size_bytes == path.stat().st_size
    assert written.header.checksum.startswith("sha256:")
    checkpoint = read_checkpoint(path, model_hash=MODEL, config_hash=CONFIG)
    assert checkpoint.header == written.header
    assert checkpoint.header.format_version == FORMAT_VERSION
    assert (checkpoint.header.position, checkpoint.header.wal_offset) == (
        2_000_000_000_001,
        123_456_789,
    )
    _assert_exact(checkpoint.tensors, _state())
    assert not list(tmp_path.glob(".*.tmp"))


def test_non_contiguous_tensors_are_written(tmp_path: Path) -> None:
    state = {"transposed": torch.arange(12.0).reshape(3, 4).t()}
    write_checkpoint(
        tmp_path / "c", state, model_hash=MODEL, config_hash=CONFIG, position=0, wal_offset=0
    )
    _assert_exact(read_checkpoint(tmp_path / "c").tensors, state)


def test_other_model_or_config_is_a_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.safetensors"
    _write(path)
    with pytest.raises(CheckpointMismatchError, match="model hash"):
        read_checkpoint(path, model_hash="sha256:other")
    with pytest.raises(CheckpointMismatchError, match="config hash"):
        read_checkpoint(path, model_hash=MODEL, config_hash="sha256:other")


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1])
def test_truncated_file_is_corrupt(tmp_path: Path, keep: int) -> None:
    path = tmp_path / "ckpt.safetensors"
    size = _write(path).size_bytes
    data = path.read_bytes()
    path.write_bytes(data[: keep % size])
    with pytest.raises(CorruptCheckpointError):
        read_checkpoint(path)


def test_flipped_tensor_byte_fails_the_checksum(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.safetensors"
    _write(path)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(data)
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        read_checkpoint(path)


def test_altered_header_field_fails_the_checksum(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.safetensors"
    _write(path, position=4096)
    data = path.read_bytes()
    assert data.count(b'"4096"') == 1
    path.write_bytes(data.replace(b'"4096"', b'"4097"'))  # same length: still parses
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        read_checkpoint(path)


def _rewrite_metadata(path: Path, change) -> None:
    """Rewrites a checkpoint's metadata with safetensors itself (a well-formed file)."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + length])["__metadata__"]
    change(metadata)
    tensors = safetensors.torch.load(data)
    path.write_bytes(safetensors.torch.save(tensors, metadata=metadata))


def test_unknown_format_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.safetensors"
    _write(path)
    _rewrite_metadata(path, lambda m: m.update({"memsvc.format_version": "99"}))
    with pytest.raises(CorruptCheckpointError, match="format version '99'"):
        read_checkpoint(path)


def test_missing_header_field_or_foreign_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.safetensors"
    _write(path)
    _rewrite_metadata(path, lambda m: m.pop("memsvc.wal_offset"))
    with pytest.raises(CorruptCheckpointError, match="wal_offset"):
        read_checkpoint(path)
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(CorruptCheckpointError, match="not a memsvc checkpoint"):
        read_checkpoint(plain)


def test_newest_valid_skips_bad_checkpoints(tmp_path: Path) -> None:
    paths = [tmp_path / f"g{i}" for i in range(4)]
    for i, path in enumerate(paths[:3]):
        _write(path, seed=i, position=100 * i)
    paths[2].write_bytes(paths[2].read_bytes()[:-10])  # newest written: truncated
    rejected: list[tuple[Path, CheckpointError | OSError]] = []
    with capture_logs() as logs:
        chosen = newest_valid_checkpoint(
            [paths[3], paths[2], paths[1], paths[0]],  # g3 was never written
            model_hash=MODEL,
            on_rejected=lambda path, error: rejected.append((path, error)),
        )
    assert chosen is not None and chosen.path == paths[1]
    assert chosen.header.position == 100
    _assert_exact(chosen.tensors, _state(1))
    assert [(p, type(e)) for p, e in rejected] == [
        (paths[3], FileNotFoundError),
        (paths[2], CorruptCheckpointError),
    ]
    events = [e for e in logs if e["event"] == "checkpoint_rejected"]
    assert [(e["path"], e["error"]) for e in events] == [
        (str(paths[3]), "FileNotFoundError"),
        (str(paths[2]), "CorruptCheckpointError"),
    ]
    assert all(e["log_level"] == "warning" and e["reason"] for e in events)
    assert newest_valid_checkpoint([paths[2], paths[3]]) is None
    assert newest_valid_checkpoint([]) is None


def test_directory_keeps_the_newest_checkpoints(tmp_path: Path) -> None:
    directory = CheckpointDirectory(tmp_path / "sessions" / "s1")
    assert directory.sequences() == []
    assert directory.newest_valid() is None
    for sequence in (1, 2, 3, 10):
        written = directory.write(
            sequence,
            _state(sequence),
            model_hash=MODEL,
            config_hash=CONFIG,
            position=sequence,
            wal_offset=0,
        )
        assert written.path == directory.path_for(sequence)
    (directory.directory / "notes.txt").write_text("not a checkpoint")
    assert directory.sequences() == [10, 3, 2, 1]

    newest = directory.path_for(10)
    newest.write_bytes(newest.read_bytes()[:100])
    rejected: list[Path] = []
    chosen = directory.newest_valid(model_hash=MODEL, on_rejected=lambda p, _: rejected.append(p))
    assert chosen is not None and chosen.header.position == 3
    assert rejected == [newest]

    assert (directory.directory / "notes.txt").exists()
    with pytest.raises(ValueError):
        directory.path_for(-1)


def test_interrupted_writes_leave_the_old_file_and_removable_temporaries(tmp_path: Path) -> None:
    directory = CheckpointDirectory(tmp_path)
    directory.write(1, _state(), model_hash=MODEL, config_hash=CONFIG, position=1, wal_offset=0)
    target = directory.path_for(1)
    before = target.read_bytes()

    def crash(file) -> None:
        file.write(b"half a checkpoint")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, crash)
    assert target.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))

    leftover = tmp_path / f".{target.name}.deadbeef.tmp"  # as a killed process leaves it
    leftover.write_bytes(b"partial")
    assert directory.sequences() == [1]
    assert directory.remove_temporaries() == [leftover]
    assert not leftover.exists()
    assert read_checkpoint(target).header.position == 1


@pytest.mark.parametrize("extra_bytes", [0, PARALLEL_HASH_BYTES], ids=["inline", "parallel"])
def test_the_written_file_equals_the_reference_encoding(tmp_path: Path, extra_bytes: int) -> None:
    # write_checkpoint writes its own safetensors header, the tensors from their
    # memory, and patches in a checksum (hashed on another thread for a large
    # state); encode_checkpoint (the safetensors library) is the reference. The
    # bytes may differ (header layout, padding); what the library reads may not.
    for seed in range(3):
        path = tmp_path / f"ckpt-{seed}"
        state = _state(seed) | {"large": torch.arange(extra_bytes // 4, dtype=torch.float32)}
        written = write_checkpoint(
            path, state, model_hash=MODEL, config_hash=CONFIG, position=seed, wal_offset=seed
        )
        expected, header = encode_checkpoint(
            state, model_hash=MODEL, config_hash=CONFIG, position=seed, wal_offset=seed
        )
        assert written.header == header and written.size_bytes == path.stat().st_size
        found = read_checkpoint(path)
        reference = decode_checkpoint(expected, source=path)
        assert found.header == reference.header == header
        _assert_exact(found.tensors, reference.tensors)
        _assert_exact(found.tensors, state)
