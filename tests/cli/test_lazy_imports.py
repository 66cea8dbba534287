"""Commands that do not run the model start without importing torch (seconds saved on
every `memsvc tenants ...`, `sessions`, `db`, `top` and every `--help`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HELP_PATHS = [
    ["train"],
    [],
    ["serve"],
    ["demo"],
    ["tenants"],
    ["tenants", "create"],
    ["sessions"],
    ["sessions", "list"],
    ["sessions", "evict"],
    ["top"],
    ["db"],
    ["db", "upgrade"],
    ["corpus"],
    ["eval"],
    ["eval", "niah"],
    ["eval", "facts"],
    ["eval", "traffic"],
    ["eval", "suite"],
    ["bench"],
    ["bench", "lmm"],
    ["bench", "serve"],
    ["bench", "swap"],
    ["bench", "reliability"],
]

# Runs each `memsvc PATH --help` in one fresh interpreter and reports, per path, whether
# torch was imported by then (it never is unloaded, so the first offender shows).
PROBE = """
import contextlib, io, json, sys
from memsvc.cli import main
seen = {}
for path in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main([*path, "--help"])
        except SystemExit:
            pass
    seen[" ".join(path) or "(top)"] = ["torch" in sys.modules, "usage: memsvc" in out.getvalue()]
print(json.dumps(seen))
"""


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg")}
    env.pop("MEMSVC_DATA_DIR", None)
    return env


def test_no_help_imports_torch(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(HELP_PATHS)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert len(seen) == len(HELP_PATHS)
    assert {path: torch for path, (torch, _) in seen.items() if torch} == {}
    assert all(usage for _, usage in seen.values())


def _imported_modules(stderr: str) -> set[str]:
    """Module names from `python -X importtime` lines ("import time: ... | ... | name")."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }


def test_tenants_create_and_db_upgrade_run_without_torch(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    for argv in (
        ["db", "upgrade", "--data-dir", str(data_dir)],
        ["tenants", "create", "ada", "--json", "--data-dir", str(data_dir)],
    ):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "memsvc.cli", *argv],
            capture_output=True,
            text=True,
            timeout=120,
            env=_env(tmp_path),
        )
        assert done.returncode == 0, done.stderr[-2000:]
        modules = _imported_modules(done.stderr)
        assert "memsvc.cli" in modules or "memsvc.settings" in modules
        assert "torch" not in modules, argv
    assert json.loads(done.stdout)["name"] == "ada"
