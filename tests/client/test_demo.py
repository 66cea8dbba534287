"""`memsvc demo` runs end to end (on the tiny model, which recalls nothing: the test
checks the tour, not the model), with runtime dependencies only: `scripts/main`
installs no extra, so every process of the demo runs with the extras' packages
made unimportable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Packages only the extras install (dev, eval, corpus, bench); the runtime must not need them.
EXTRAS_ONLY = ("pytest", "hypothesis", "matplotlib", "faker", "titans_pytorch", "grpc_tools")


def _without_extras(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python processes (the demo's children too) cannot import
    the extras' packages: a sitecustomize on PYTHONPATH marks them missing."""
    site = tmp_path / "runtime-only"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in EXTRAS_ONLY)
    )
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def test_demo_streams_restarts_and_asks(tmp_path: Path, model_dir: Path) -> None:
    data_dir = tmp_path / "demo"
    flags = ["--model", str(model_dir), "--data-dir", str(data_dir)]
    sizes = ["--tokens", "2048", "--piece-tokens", "512"]
    done = subprocess.run(
        [sys.executable, "-m", "memsvc.cli", "demo", *flags, *sizes],
        capture_output=True,
        text=True,
        timeout=300,
        env={**_without_extras(tmp_path), "COLUMNS": "40"},  # paths longer than a line stay whole
    )
    assert done.returncode == 0, done.stderr + done.stdout
    out = done.stdout
    assert "restarting the server" in out
    assert "answer after the restart:" in out
    assert "tokens/s" in out
    assert str(data_dir / "memsvc.db") in out
    assert len(list((data_dir / "sessions").glob("*/checkpoints/*.safetensors"))) == 1
