"""`memsvc eval suite`: every recall goal of the keyed-facts and real-text work in one run, as
one JSON report and one Markdown table (what a model card quotes).

memsvc eval suite --model runs/x/model --out docs/eval/x          # the full suite
memsvc eval suite --model runs/x/model --out /tmp/x --scale 0.25  # fewer probes

Rows: keyed facts (digits 8 @ 16k, 16 @ 64k; words and codes 4 @ 16k; UUID 1 @ 4k;
revised facts @ 16k; 8 facts @ 16k in every real kind), passkey in synthetic
haystacks (1k to 1M) and in every held-out real kind (4k to 256k), the
sliding-window-only ablation, and updates per 1k tokens on plain filler. Every
probe uses held-out phrasing, keys and filler, 20% distractor sentences.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from memsvc.corpus import KINDS
from memsvc.eval.options import add_model_options

if TYPE_CHECKING:
    from memsvc.engine import StreamingEngine
    from memsvc.eval.facts import FactCell

REAL = tuple(f"real:{kind}" for kind in KINDS)


@dataclass(frozen=True)
class Row:
    name: str
    goal: float  # exact match to reach (the goal); a maximum when `at_most`
    samples: int  # probes (streams) at scale 1
    facts: FactCell | None = None
    passkey: tuple[str, int] | None = None  # (haystack, length)
    no_memory: bool = False
    at_most: bool = False


def rows() -> list[Row]:
    from memsvc.eval.facts import FactCell

    out = [
        Row("facts digits 8 @ 16k", 0.90, 8, FactCell("sentences", 16384, 8, ("digits",))),
        Row("facts digits 16 @ 64k", 0.80, 4, FactCell("sentences", 65536, 16, ("digits",))),
        Row("facts words 4 @ 16k", 0.90, 8, FactCell("sentences", 16384, 4, ("words",))),
        Row("facts codes 4 @ 16k", 0.90, 8, FactCell("sentences", 16384, 4, ("code",))),
        Row("facts uuid 1 @ 4k", 0.90, 32, FactCell("sentences", 4096, 1, ("uuid",))),
        Row("revised facts 4 (2 revised) @ 16k", 0.90, 8,
            FactCell("sentences", 16384, 4, ("digits", "code"), revised=2)),
    ]  # fmt: skip
    out += [
        Row(f"facts digits 8 @ 16k, {h}", 0.90, 4, FactCell(h, 16384, 8, ("digits",))) for h in REAL
    ]
    for length, samples in ((1024, 32), (4096, 32), (16384, 32), (65536, 32), (1 << 18, 16),
                            (1 << 20, 8)):  # fmt: skip
        out.append(Row(f"passkey @ {_label(length)}", 0.95, samples, passkey=("sentences", length)))
    for h in REAL:
        for length, goal, samples in ((4096, 0.95, 16), (16384, 0.95, 16), (65536, 0.90, 8),
                                      (1 << 18, 0.90, 4)):  # fmt: skip
            out.append(Row(f"passkey @ {_label(length)}, {h}", goal, samples, passkey=(h, length)))
    out.append(Row("no memory: passkey @ 4k", 0.10, 32, passkey=("sentences", 4096),
                   no_memory=True, at_most=True))  # fmt: skip
    return out


def _label(length: int) -> str:
    for unit, size in (("m", 1 << 20), ("k", 1 << 10)):
        if length % size == 0:
            return f"{length // size}{unit}"
    return str(length)


def run_row(engines: dict[bool, StreamingEngine], row: Row, samples: int) -> dict:
    from memsvc.eval.facts import evaluate_cell
    from memsvc.eval.niah import evaluate_length
    from memsvc.eval.probe import ProbeSpec

    engine = engines[not row.no_memory]
    window = engine.model.config.window
    began = time.perf_counter()
    if row.facts is not None:
        results, stats = evaluate_cell(engine, row.facts, range(samples), window)
        correct = [r.correct for r in results]
        if row.facts.revised:
            correct = [r.correct for r in results if r.revised]
        extra = {"updates_per_1k": round(stats.updates_per_1k, 2)}
    else:
        haystack, length = row.passkey
        spec = ProbeSpec("passkey", length, window, haystack=haystack, distractor_rate=0.2)
        result = evaluate_length(engine, spec, range(samples))
        correct = [r.correct for r in result.results]
        extra = {"tokens_per_s": round(result.tokens_per_s)}
    accuracy = sum(correct) / len(correct)
    met = accuracy <= row.goal if row.at_most else accuracy >= row.goal
    return {
        "row": row.name,
        "accuracy": accuracy,
        "n": len(correct),
        "goal": ("<= " if row.at_most else ">= ") + f"{row.goal:.0%}",
        "met": met,
        "seconds": round(time.perf_counter() - began, 1),
        **extra,
    }


def add_suite_parser(evals: argparse._SubParsersAction) -> None:
    suite = evals.add_parser(
        "suite",
        help="every recall goal in one run: a JSON report and a Markdown table",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(suite)
    suite.add_argument("--out", type=Path, required=True, help="directory for report files")
    suite.add_argument(
        "--scale", type=float, default=1.0, help="probes per row x this (at least 1; default 1)"
    )
    suite.add_argument(
        "--rows",
        default="",
        help="only rows whose name contains one of these comma-separated words",
    )
    suite.set_defaults(func=run_suite)  # fmt: skip


def run_suite(args: argparse.Namespace) -> int:
    if args.no_memory:
        print("memsvc eval suite: the suite runs its own no-memory row", file=sys.stderr)
        return 2
    from memsvc.engine import StreamingEngine
    from memsvc.eval.options import load_eval_model
    from memsvc.model.io import model_hash

    model = load_eval_model(args)
    engines = {True: StreamingEngine(model), False: StreamingEngine(model, use_memory=False)}
    wanted = [w for w in args.rows.split(",") if w]
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"model": str(args.model), "model_hash": model_hash(model),
              "memory_set": dict(args.memory_set), "scale": args.scale, "rows": []}  # fmt: skip
    for row in rows():
        if wanted and not any(w in row.name for w in wanted):
            continue
        samples = max(1, math.ceil(row.samples * args.scale))
        try:
            result = run_row(engines, row, samples)
        except FileNotFoundError as error:
            print(f"memsvc eval suite: {error}", file=sys.stderr)
            return 2
        report["rows"].append(result)
        verdict = "" if result["met"] else ", NOT met"
        print(f"{result['row']:40} {result['accuracy']:6.1%} of {result['n']:3} "
              f"(goal {result['goal']}{verdict})", flush=True)  # fmt: skip
        (args.out / "suite.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "suite.md").write_text(markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = [
        f"Model `{report['model']}` (sha256 {report['model_hash'][:12]}), "
        f"memory knobs {report['memory_set'] or 'as trained'}, probe scale {report['scale']}.",
        "",
        "| row | exact match | probes / facts | goal | met |",
        "|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['row']} | {r['accuracy']:.1%} | {r['n']} | {r['goal']} | "
                     f"{'yes' if r['met'] else 'no'} |")  # fmt: skip
    return "\n".join(lines) + "\n"
