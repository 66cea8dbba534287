"""Guard thresholds from measured traffic: the rule, the CLI that writes them and the
server-side reading of a model's guards.json."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from memsvc.engine import StreamingEngine
from memsvc.eval.calibration import MARGIN, MIN_GROWTH, calibrate
from memsvc.model.io import load_model
from memsvc.obs.thresholds import (
    CALIBRATION_FILE,
    NORM_BOUND_FACTOR,
    default_guard_config,
    fresh_memory_norm,
    read_calibration,
)


def summary(stream: str, ratio: float, growth: float) -> dict:
    return {
        "stream": stream,
        "tokens": 1000,
        "norm_ratio": {"p50": ratio / 2, "p100": ratio},
        "norm_growth_per_window": {"p100": growth},
        "input_entropy": {"p0": 4.0, "p100": 6.0},
    }


def test_the_rule_takes_the_text_maxima_with_the_margin_and_ignores_adversaries():
    found = calibrate(
        [
            summary("real:code", 6.0, 1.4),
            summary("sentences", 4.0, 1.1),
            summary("adversarial:random", 50.0, 9.0),  # never calibrates the bounds
        ],
        saturation_fraction=0.9,
    )
    assert found["norm_bound_factor"] == pytest.approx(MARGIN * 6.0 / 0.9, abs=1e-3)
    assert found["max_norm_growth"] == pytest.approx(MARGIN * 1.4)
    assert found["measured"]["streams"] == ["real:code", "sentences"]
    quiet = calibrate([summary("sentences", 3.0, 1.01)], saturation_fraction=0.9)
    assert quiet["max_norm_growth"] == MIN_GROWTH
    with pytest.raises(ValueError, match="text stream"):
        calibrate([summary("adversarial:repeat", 1.0, 1.0)])


def test_a_model_without_calibration_keeps_the_default_bound(tmp_path: Path):
    from memsvc.settings import REFERENCE_MODEL_DIR

    engine = StreamingEngine(load_model(REFERENCE_MODEL_DIR))
    assert read_calibration(tmp_path) == {} and fresh_memory_norm(engine) > 0
    config = default_guard_config(engine, read_calibration(tmp_path))
    assert config.norm_bound == pytest.approx(NORM_BOUND_FACTOR * fresh_memory_norm(engine))


def test_cli_calibrates_on_training_text_and_the_model_dir_serves_it(tmp_path: Path):
    from memsvc.settings import REFERENCE_MODEL_DIR

    model_dir = tmp_path / "model"
    shutil.copytree(REFERENCE_MODEL_DIR, model_dir)
    out = model_dir / CALIBRATION_FILE
    done = subprocess.run(
        [sys.executable, "-m", "memsvc.cli", "eval", "traffic", "--model", str(model_dir),
         "--streams", "real:logs,sentences,adversarial:random", "--tokens", "3000",
         "--piece", "512", "--window-tokens", "1024", "--threads", "1", "--split", "train",
         "--calibrate", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    written = json.loads(out.read_text())
    assert written["measured"]["streams"] == ["real:logs", "sentences"]
    assert written["norm_bound_factor"] > 1.0
    calibration = read_calibration(model_dir)
    assert set(calibration) == {
        "norm_bound_factor", "max_norm_growth", "min_input_entropy", "max_input_entropy"
    }  # fmt: skip
    engine = StreamingEngine(load_model(model_dir))
    config = default_guard_config(engine, calibration, window_tokens=512)
    assert config.norm_bound == pytest.approx(
        written["norm_bound_factor"] * fresh_memory_norm(engine)
    )
    assert config.max_norm_growth == written["max_norm_growth"] and config.window_tokens == 512
