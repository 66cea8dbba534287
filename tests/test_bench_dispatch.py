"""`memsvc bench dispatch`: the three ways compute the same chain, and the report holds."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from memsvc.bench.dispatch import LINKS, OPS, chain, measure


def test_the_chain_is_the_documented_ops() -> None:
    x, w, w2 = torch.randn(1, 8), torch.randn(8, 16), torch.randn(8, 8)
    d, y = 8, x
    for _ in range(LINKS):
        z = x @ w
        x = torch.sigmoid(z[:, :d] + z[:, d:] * x) * x
    torch.testing.assert_close(chain(y, w, w2, LINKS), x @ w2)
    assert OPS == 5 * LINKS + 1


def test_measure_reports_eager_and_torchscript_per_op() -> None:
    report = measure(dim=16, calls=2, repeats=1, cpp=False)
    assert set(report["us_per_op"]) == {"eager", "torchscript"}
    assert all(v > 0 for v in report["us_per_op"].values())
    assert report["speedup_vs_eager"]["eager"] == 1.0


def test_the_command_prints_json() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "memsvc.cli", "bench", "dispatch", "--no-cpp", "--dim", "16",
         "--calls", "2", "--repeats", "1", "--json"],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    report = json.loads(out.stdout)
    assert report["ops_per_call"] == OPS and "torchscript" in report["us_per_op"]
