"""`python -m memsvc.eval`: the eval commands on a machine with torch alone (no gRPC,
SQL or Redis imported), as scripts/gpu-session runs them on a lent GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SERVER_ONLY = ("grpc", "sqlalchemy", "redis", "alembic", "memsvc.server", "memsvc.store")


def test_eval_facts_runs_as_a_module_without_the_servers_imports(tmp_path: Path) -> None:
    out = tmp_path / "facts.json"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "memsvc.eval", "facts", "--lengths", "1k",
         "--facts", "2", "--samples", "1", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }
    assert "memsvc.eval.facts" in imported
    assert not {m for m in imported if m.split(".")[0] in SERVER_ONLY or m in SERVER_ONLY}
    report = json.loads(out.read_text())
    [cell] = report["cells"]
    assert (cell["length"], cell["facts"], cell["questions"]) == (1024, 2, 2)
    assert 0.0 <= cell["accuracy"] <= 1.0
