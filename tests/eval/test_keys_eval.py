"""`memsvc eval keys`: counts every question once per block, leaves the model as it was,
and refuses what it cannot measure."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from memsvc.eval.keys import _find, key_match
from memsvc.model.io import load_model
from memsvc.settings import model_dir
from memsvc.train.facts import make_fact_probe


def test_write_positions_are_the_values_first_bytes() -> None:
    probe = make_fact_probe(0, 1024, 4, ("digits",), window=128)
    context = probe.context.tolist()
    for question in probe.questions:
        at = _find(context, question.answer.encode())
        assert bytes(context[at : at + len(question.answer)]) == question.answer.encode()
    with pytest.raises(AssertionError, match="not in the context"):
        _find(context, b"no such value here")


def test_key_match_counts_each_question_per_block_and_restores_the_model() -> None:
    model = load_model(model_dir("default"))
    blocks = key_match(model, 1024, 3, 2, "heldout", ("digits",))
    assert len(blocks) == model.config.n_layers
    for b in blocks:
        assert b.questions == 6 and 0 <= b.matched <= 6
        assert -1 <= b.other <= 1 and -1 <= b.own <= 1
    for block in model.blocks:
        assert block.memory.keep_queries is False and block.memory.last_queries is None


def test_the_command_prints_json_and_refuses_one_fact() -> None:
    base = [sys.executable, "-m", "memsvc.cli", "eval", "keys", "--threads", "1"]
    out = subprocess.run(
        [*base, "--facts", "2", "--samples", "1", "--length", "512", "--json"],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    report = json.loads(out.stdout)
    assert report["chance"] == 0.5 and len(report["blocks"]) == 2
    assert report["blocks"][0]["questions"] == 2
    bad = subprocess.run([*base, "--facts", "1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--facts >= 2" in bad.stderr
