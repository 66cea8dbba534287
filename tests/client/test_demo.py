"""`memsvc demo` runs end to end (on the tiny model, which recalls nothing: the test
checks the tour, not the model)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_demo_streams_restarts_and_asks(tmp_path: Path, model_dir: Path) -> None:
    data_dir = tmp_path / "demo"
    flags = ["--model", str(model_dir), "--data-dir", str(data_dir)]
    sizes = ["--tokens", "2048", "--piece-tokens", "512"]
    done = subprocess.run(
        [sys.executable, "-m", "memsvc.cli", "demo", *flags, *sizes],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "40"},  # paths longer than a line stay whole
    )
    assert done.returncode == 0, done.stderr + done.stdout
    out = done.stdout
    assert "restarting the server" in out
    assert "answer after the restart:" in out
    assert "tokens/s" in out
    assert str(data_dir / "memsvc.db") in out
    assert len(list((data_dir / "sessions").glob("*/checkpoints/*.safetensors"))) == 1
