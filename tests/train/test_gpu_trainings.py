"""scripts/gpu-trainings, dry-run on the CPU as a lease would run it on a GPU: a chained run
trains stage after stage, its eval table is written, and what comes back resumes exactly
here (a checkpoint brought back without its `latest` pointer could not be resumed, found in
a real lease)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

from memsvc.train.checkpoints import checkpoint_position

ROOT = Path(__file__).resolve().parents[2]


def test_a_run_comes_back_scored_and_resumable(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    jobs.write_text(
        "# a comment\n"
        "tiny | --device cpu --threads 1 --max-steps 1 --batch-size 2 --curriculum facts"
        " --init-from memsvc/assets/reference-model"
        " >> --device cpu --threads 1 --max-steps 2 --batch-size 2 --curriculum facts"
        " --checkpoint-every 1\n"
        "broken | --device cpu --threads 1 --max-steps 1 --batch-size 2 --curriculum facts"
        " --init-from memsvc/assets/reference-model >> --curriculum no-such-curriculum\n"
    )
    out, runs = tmp_path / "out", tmp_path / "runs"
    env = {
        **os.environ,
        "OUT": str(out),
        "GPU_RUNS": str(runs),
        "PYTHON": sys.executable,
        "GPU_TRAIN_END_S": "240",
        "GPU_EVAL_END_S": "400",
        "GPU_EVAL_SCALE": "0.01",
        "GPU_EVAL_GROUPS": "uuid",
    }
    done = subprocess.run(
        ["bash", "scripts/gpu-trainings", str(jobs)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=500,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "tiny | facts uuid 1 @ 4k |" in done.stdout
    # the second stage started from the first one's model, the default's copy
    assert f"--init-from {runs}/tiny.s0/model" in done.stdout
    first = (runs / "tiny.s0" / "model" / "model.safetensors").read_bytes()
    assert first != (ROOT / "memsvc/assets/reference-model/model.safetensors").read_bytes()
    # a stage that fails leaves the job the model of the stage before it, scored as well
    assert "broken: stage 1 left no model" in done.stdout
    assert "broken | facts uuid 1 @ 4k |" in done.stdout
    assert (out / "run-broken.tar.gz").is_file()
    assert (out / "eval.tar.gz").is_file() and (out / "logs.tar.gz").is_file()

    back = tmp_path / "back"
    with tarfile.open(out / "run-tiny.tar.gz") as archive:
        archive.extractall(back, filter="data")
    assert (back / "tiny" / "model" / "model.safetensors").is_file()
    latest = back / "tiny" / "checkpoints" / "latest"
    assert checkpoint_position(back / "tiny" / "checkpoints" / latest.read_text().strip()) == (
        2,
        0,
    )
    resumed = subprocess.run(
        [sys.executable, "-m", "memsvc.train.cli", "--out", str(back / "tiny"), "--resume",
         "--device", "cpu", "--threads", "1", "--max-steps", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert '"step": 2' in resumed.stderr and '"reason": "max_steps", "step": 3' in resumed.stderr
