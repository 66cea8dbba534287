"""`memsvc eval facts` plumbing: questions asked on copies of the state, scores, slices,
plots and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from memsvc.engine import StreamingEngine
from memsvc.eval.facts import (
    FactCell,
    answered_other_key,
    ask,
    evaluate_cell,
    stream,
    summarize,
)
from memsvc.eval.plot import plot_results
from memsvc.train.facts import make_fact_probe
from memsvc.train.phrasing import HELDOUT_PHRASING, PHRASINGS
from tests.engine.conftest import tiny_model


def probe_text(cell: FactCell, seed: int, window: int) -> str:
    probe = make_fact_probe(seed, cell.length, cell.n_facts, cell.value_kinds, window=window,
                            haystack=cell.haystack, revised=cell.revised)  # fmt: skip
    return bytes(probe.context[1:].tolist()).decode()


def test_asking_leaves_the_streamed_state_unchanged() -> None:
    engine = StreamingEngine(tiny_model(), max_segment=64)
    probe = make_fact_probe(0, 900, 3, ("digits",), window=engine.model.config.window)
    state, (applied, skipped) = stream(engine, probe)
    before = {k: v.clone() for k, v in state.to_dict().items()}
    answers = [ask(engine, state, q) for q in probe.questions]
    assert answers == [ask(engine, state, q) for q in probe.questions]  # same state each time
    assert all(v.equal(before[k]) for k, v in state.to_dict().items())
    assert applied > 0 and skipped == 0


def test_cells_score_every_fact_and_slices_add_up(tmp_path: Path) -> None:
    engine = StreamingEngine(tiny_model(), max_segment=64)
    cell = FactCell("real:code", 900, 4, ("digits", "words"), revised=1)
    results, stats = evaluate_cell(engine, cell, range(2), engine.model.config.window)
    assert len(results) == 8 and stats.tokens == 2 * 900
    assert sum(r.revised for r in results) == 2
    for r in results:
        assert r.correct == (r.output == r.answer)
        asked = [o.answer for o in results if o.seed == r.seed]
        assert r.other_key == answered_other_key(r.output, r.answer, asked)
        # the phrasing it was stated and asked in, for per-template reports
        assert r.answer in r.stated and r.stated in probe_text(
            cell, r.seed, engine.model.config.window
        )
        assert r.asked and r.answer not in r.asked
    summary = summarize(results, HELDOUT_PHRASING)
    for part in ("statement", "question", "lead"):  # every held-out fact traced to its template
        rows = summary[f"by_{part}"]
        assert sum(row["n"] for row in rows) == 8 and "other" not in [row["key"] for row in rows]
    assert 0 <= summary["overall"]["other_key"] <= 1 - summary["overall"]["accuracy"]
    assert summary["overall"]["n"] == 8
    assert sum(row["n"] for row in summary["by_length_depth"]) == 8
    assert sum(row["n"] for row in summary["by_kind"]) == 8
    plot_results(results, tmp_path / "facts.png", "test")
    assert (tmp_path / "facts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_cell_can_state_its_facts_value_first_and_then_has_no_template_slices() -> None:
    engine = StreamingEngine(tiny_model(), max_segment=64)
    window = engine.model.config.window
    cell = FactCell("sentences", 900, 3, ("digits",), vocabulary="train", phrasing="value-first")
    results, _ = evaluate_cell(engine, cell, range(2), window)
    assert len(results) == 6
    for r in results:  # stated in the training grammar (value first: tests/train/test_grammar)
        assert r.answer in r.stated
    default = evaluate_cell(engine, replace(cell, phrasing=None), range(2), window)[0]
    assert [r.stated for r in default] != [r.stated for r in results]
    summary = summarize(results, PHRASINGS["value-first"])
    assert summary["overall"]["n"] == 6 and "by_statement" not in summary


def test_other_key_is_another_facts_value_cut_or_run_on_to_the_answers_length() -> None:
    answers = ["48213", "7710", "K7Q2X9", "48213"]  # a value may repeat across keys
    assert answered_other_key("77104", "48213", answers)  # 7710 run on to 5 bytes
    assert answered_other_key("K7Q", "771", answers)  # K7Q2X9 cut to 3 bytes
    assert answered_other_key("K7Q", "K7Q2X9"[:3], ["K7Q", "K7Q2X9"]) is False  # right
    assert answered_other_key("48213", "48213", answers) is False  # right is never other
    assert answered_other_key("99999", "48213", answers) is False
    assert answered_other_key("", "", []) is False


def test_cli_runs_a_cell_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "memsvc.cli", "eval", "facts", "--lengths", "600", "--facts",
         "2", "--values", "code", "--haystack", "real:german", "--samples", "1", "--threads",
         "1", "--json", "--out", str(out), "--memory-set", "tau=0.5"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["memory_set"] == {"tau": 0.5}
    assert report["cells"][0]["questions"] == 2 and len(report["results"]) == 2


def test_cli_refuses_a_bad_override() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "memsvc.cli", "eval", "facts", "--memory-set", "dim=3"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "NAME one of" in done.stderr


def test_suite_runs_selected_rows_and_writes_its_table(tmp_path: Path) -> None:
    from memsvc.eval.suite import rows

    names = [row.name for row in rows()]
    assert len(names) == len(set(names))
    done = subprocess.run(
        [sys.executable, "-m", "memsvc.cli", "eval", "suite", "--out", str(tmp_path),
         "--scale", "0.01", "--rows", "uuid 1 @ 4k,no memory", "--threads", "1"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "suite.json").read_text())
    assert [r["row"] for r in report["rows"]] == ["facts uuid 1 @ 4k", "no memory: passkey @ 4k"]
    assert all(r["n"] == 1 for r in report["rows"])
    assert "| facts uuid 1 @ 4k |" in (tmp_path / "suite.md").read_text()
