"""kernels/decode_step: how the C++ step is switched off, built and found. Its arithmetic
is held equal to the eager step (and the chunk path) by tests/model/test_decode.py,
which runs every decoder test on both."""

from __future__ import annotations

import fcntl
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import decode_step


def test_switched_off_it_is_never_built_or_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMSVC_DECODE_CPP", "0")
    assert not decode_step.enabled()
    assert decode_step.module() is None
    with pytest.raises(RuntimeError, match="MEMSVC_DECODE_CPP=0"):
        decode_step.load()


def test_it_builds_here_and_then_module_returns_it() -> None:
    built = decode_step.load()
    assert decode_step.module() is built and decode_step.error() is None
    step = built.LayerStep()
    assert hasattr(step, "attend") and hasattr(step, "mix")


def test_a_lock_left_by_a_killed_build_blocks_no_later_build() -> None:
    """torch's lock file outlives a process killed holding it (a server under kill -9);
    the next build clears it instead of waiting on it (it waited 15 minutes)."""
    decode_step.load()
    lock = decode_step.build_directory() / "lock"
    lock.touch()  # what a builder killed inside torch's `load` leaves
    code = "import kernels.decode_step as d; d.load(); print('loaded')"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr[-400:]
    # Another builder (a server's build child, another checkout's tests) may be inside
    # torch's `load` now, holding a live lock; once no builder is, none is left.
    with open(decode_step.build_directory() / "build.flock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        assert not lock.exists()
