"""The fuzz campaign's optional dependency: hypothesis comes with the `reliability` extra,
and `memsvc bench reliability --parts fuzz` without it says so before running anything.
The missing install is simulated in a fresh interpreter (sys.modules['hypothesis'] = None
makes every import of it fail), so nothing here uninstalls anything."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_without_hypothesis(code: str) -> subprocess.CompletedProcess[str]:
    prelude = "import sys; sys.modules['hypothesis'] = None\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )


def test_bench_reliability_fuzz_names_the_extra_without_hypothesis(tmp_path: Path) -> None:
    argv = ["bench", "reliability", "--parts", "fuzz", "--workdir", str(tmp_path)]
    done = run_without_hypothesis(f"from memsvc.cli import main\nsys.exit(main({argv!r}))")
    assert done.returncode == 2, done.stderr
    assert "memsvc[reliability]" in done.stderr
    assert "hypothesis" in done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # nothing ran


def test_the_plain_parts_of_fuzz_import_without_hypothesis() -> None:
    done = run_without_hypothesis(
        "import memsvc.reliability.fuzz.calls, memsvc.reliability.fuzz.mutations\n"
        "from memsvc.reliability.fuzz import MissingExtraError, require_hypothesis\n"
        "try:\n    require_hypothesis()\nexcept MissingExtraError as e:\n    print(e)\n"
    )
    assert done.returncode == 0, done.stderr
    assert "reliability" in done.stdout


def test_the_reliability_extra_holds_hypothesis() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra = project["optional-dependencies"]["reliability"]
    assert any(req.startswith("hypothesis") for req in extra)
