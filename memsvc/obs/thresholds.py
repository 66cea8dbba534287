"""A served model's guard thresholds: measured ones from its `guards.json` (written by
`memsvc eval traffic --calibrate`, docs/GUARDS.md), else the uncalibrated default.

The saturation bound scales with the model: a multiple of the norm of a fresh
session's memory, measured the one way `AppendStats` measures it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from memsvc.obs.guard import GuardConfig

if TYPE_CHECKING:
    from memsvc.engine import StreamingEngine

# A model directory's measured guard thresholds (`memsvc eval traffic --calibrate`,
# docs/GUARDS.md): norm_bound_factor, max_norm_growth and the input-entropy band.
CALIBRATION_FILE = "guards.json"
CALIBRATED_FIELDS = ("max_norm_growth", "min_input_entropy", "max_input_entropy")

# Without a calibration: the saturation bound is this many times a fresh session's memory
# norm (what the first reference model shipped with, chosen rather than measured).
NORM_BOUND_FACTOR = 8.0


def read_calibration(model_dir: str | os.PathLike[str]) -> dict[str, float]:
    """The guard thresholds measured for the model in `model_dir` ({} when it has none)."""
    path = Path(model_dir) / CALIBRATION_FILE
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {k: float(data[k]) for k in ("norm_bound_factor", *CALIBRATED_FIELDS) if k in data}


def fresh_memory_norm(engine: StreamingEngine) -> float:
    """The memory norm of a fresh session, measured the one way `AppendStats` measures it
    (0 for a model without memory)."""
    return engine.append(engine.init_state(), [])[1].memory_norm


def default_guard_config(
    engine: StreamingEngine, calibration: Mapping[str, float] | None = None, **overrides: float
) -> GuardConfig:
    """The guards' thresholds for the served model: its `calibration` (`read_calibration`)
    where measured, else `norm_bound` NORM_BOUND_FACTOR times a fresh memory's norm;
    `overrides` replace any field (norm_bound included).

    A model whose fresh memory is all zeros (an untrained one) gives no scale: its bound
    is infinite, so only an explicit norm_bound makes the guards call it saturated (the
    update-explosion trigger is relative and works regardless)."""
    calibration = dict(calibration or {})
    factor = calibration.pop("norm_bound_factor", NORM_BOUND_FACTOR)
    bound = factor * fresh_memory_norm(engine)
    fields = {"norm_bound": bound if bound > 0 else math.inf, **calibration, **overrides}
    return GuardConfig(**fields)
