"""The names `memsvc train` offers: model presets, memory kinds and curricula.

Kept apart from `recipe.py`, which builds configs with torch, so that the trainer's
command line (and `memsvc train --help`) is parsed without importing torch.
"""

from __future__ import annotations

from typing import Literal

MemoryKind = Literal["delta", "mlp", "deep2", "deep4"]
MEMORY_KINDS: tuple[MemoryKind, ...] = ("delta", "mlp", "deep2", "deep4")
PRESETS = ("tiny", "reference")
CURRICULA = ("reference", "long", "recall", "facts", "long-mixed", "long-128k")
