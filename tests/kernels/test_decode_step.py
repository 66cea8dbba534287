"""kernels/decode_step: how the C++ step is switched off, built and found. Its arithmetic
is held equal to the eager step (and the chunk path) by tests/model/test_decode.py,
which runs every decoder test on both."""

from __future__ import annotations

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
