"""`memsvc eval traffic` plumbing: streams, samples, the guard's decisions and summaries."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch

from memsvc.engine import StreamingEngine
from memsvc.eval.traffic import run_stream, stream_bytes, summarize_run, window_growths
from memsvc.obs.guard import GuardConfig
from tests.engine.conftest import tiny_model


@pytest.mark.parametrize("stream", ["real:json", "sentences", "adversarial:random"])
def test_streams_are_deterministic(stream: str) -> None:
    first = b"".join(islice(stream_bytes(stream, 3), 5))
    assert first == b"".join(islice(stream_bytes(stream, 3), 5)) and len(first) > 200
    assert first != b"".join(islice(stream_bytes(stream, 4), 5))


def test_repeat_stream_is_one_byte() -> None:
    assert len(set(next(stream_bytes("adversarial:repeat", 0)))) == 1


def test_samples_follow_the_stream_and_a_low_bound_fires_saturation() -> None:
    engine = StreamingEngine(tiny_model(), max_segment=64)
    calm = GuardConfig(norm_bound=math.inf, window_tokens=256)
    run = run_stream(engine, "real:code", 2000, calm, piece=128)
    assert run.tokens == 2000 and run.samples[-1].position == 2000
    assert [s.position for s in run.samples] == sorted(s.position for s in run.samples)
    assert run.mitigations == ()
    summary = summarize_run(run, 256)
    assert summary["norm_ratio"]["p50"] > 0 and summary["updates_per_1k"] > 0
    assert len(window_growths(run, 256)) > 0

    tight = GuardConfig(norm_bound=1e-6, window_tokens=256, recovery_tokens=256)
    fired = run_stream(engine, "real:code", 2000, tight, piece=128)
    assert fired.mitigations and fired.mitigations[0]["kind"] == "saturation"
    assert fired.mitigations[0]["position"] >= 256  # the guard waits one window, as served


def test_cli_writes_a_report(tmp_path: Path) -> None:
    out = tmp_path / "traffic.json"
    done = subprocess.run(
        [sys.executable, "-m", "memsvc.cli", "eval", "traffic", "--streams",
         "real:logs,adversarial:repeat", "--tokens", "3000", "--piece", "512",
         "--window-tokens", "1024", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert [s["stream"] for s in report["summaries"]] == ["real:logs", "adversarial:repeat"]
    assert len(report["runs"][0]["samples"]) == 6


def test_recall_through_runs_both_arms_and_only_noise_is_mitigated() -> None:
    from memsvc.eval.mitigation import recall_through

    engine = StreamingEngine(tiny_model(), max_segment=64)
    guard = GuardConfig(norm_bound=math.inf, window_tokens=256, max_norm_growth=1e9)
    noise = recall_through(engine, "adversarial:random", 1024, guard, range(2), length=512)
    assert noise.probes == 2 and noise.mitigations >= 1
    assert 0.0 <= noise.guarded <= 1.0 and 0.0 <= noise.unguarded <= 1.0
    text = recall_through(engine, "sentences", 1024, guard, range(2), length=512)
    assert text.mitigations == 0
    assert text.guarded == text.unguarded  # nothing fired: the same bytes, the same state


def test_a_stream_that_goes_non_finite_ends_with_that_entry() -> None:
    from dataclasses import replace

    from memsvc.eval.traffic import stream_guarded
    from memsvc.model.model import MAGModel
    from memsvc.train.recipe import model_config
    from tests.server.test_operations import HOSTILE_MEMORY

    torch.manual_seed(0)
    model = MAGModel(replace(model_config("tiny"), memory=HOSTILE_MEMORY)).eval()
    engine = StreamingEngine(model)
    state = engine.init_state()
    _, samples, entries, _ = stream_guarded(
        engine, state, stream_bytes("adversarial:random", 0), 1 << 16, None, piece=256
    )
    assert entries[-1]["kind"] == "non_finite"
    assert entries[-1]["position"] < 1 << 16  # it ended where the memory broke
    assert all(math.isfinite(s.memory_norm) for s in samples)
