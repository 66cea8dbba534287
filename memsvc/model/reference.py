"""Where the shipped reference model lives: a model directory inside the package.

It is the default model of `memsvc serve`, `memsvc demo` and `memsvc eval`;
its MODEL_CARD.md says how it was trained and what it recalls.
"""

from __future__ import annotations

from pathlib import Path

REFERENCE_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "reference-model"
