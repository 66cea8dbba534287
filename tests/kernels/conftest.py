"""Kernel tests run on the GPU when there is one, else on the CPU under Triton's interpreter.

TRITON_INTERPRET is read when a kernel is defined (when kernels.lmm.triton_chunk
is imported), so it is set here, before any test module of this folder loads.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
