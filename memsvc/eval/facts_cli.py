"""`memsvc eval facts`: keyed-fact recall by haystack, length, number of facts, value kind and
depth, through the streaming engine, on phrasings, keys and filler never trained on.

memsvc eval facts --lengths 16k --facts 8 --values digits --samples 8
memsvc eval facts --lengths 4k,16k --facts 1,4,8,16 --haystack sentences,real:english
memsvc eval facts --values words,code --facts 4 --revised 2 --plot facts.png
memsvc eval facts --memory-set tau=0.5      # the write gate on (an ablation)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from memsvc.eval.options import add_model_options, parse_length
from memsvc.train.haystack import HAYSTACKS
from memsvc.train.phrasing import PHRASINGS, VALUE_KINDS

if TYPE_CHECKING:
    from memsvc.eval.facts import FactCell, StreamStats


def _csv(parse):
    return lambda text: [parse(x) for x in text.split(",") if x]


def _haystack(name: str) -> str:
    if name not in HAYSTACKS:
        raise argparse.ArgumentTypeError(f"unknown haystack {name!r} ({', '.join(HAYSTACKS)})")
    return name


def _value_kind(name: str) -> str:
    if name not in VALUE_KINDS:
        raise argparse.ArgumentTypeError(f"unknown value kind {name!r} ({', '.join(VALUE_KINDS)})")
    return name


def add_facts_parser(evals: argparse._SubParsersAction) -> None:
    facts = evals.add_parser(
        "facts",
        help="keyed-fact recall: many facts, each asked by its key (revisions: latest wins)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(facts)
    facts.add_argument(
        "--lengths",
        type=_csv(parse_length),
        default="4k,16k",
        help="context tokens, k = 1024, m = 1048576 (default 4k,16k)",
    )
    facts.add_argument(
        "--facts",
        type=_csv(int),
        default="1,4,8",
        help="facts per stream, one cell each (default 1,4,8)",
    )
    facts.add_argument(
        "--values",
        type=_csv(_value_kind),
        default="digits",
        help=f"value kinds, one cell each ({', '.join(VALUE_KINDS)}; default digits)",
    )
    facts.add_argument(
        "--haystack",
        type=_csv(_haystack),
        default="sentences",
        help="haystacks, one cell each: sentences, words, repeated or "
        "real:<kind> (held-out corpus text; default sentences)",
    )
    facts.add_argument(
        "--revised",
        type=int,
        default=0,
        help="facts per stream restated later with a new value (default 0)",
    )
    facts.add_argument(
        "--distractors",
        type=float,
        default=0.2,
        help="share of haystack units that are sentences with numbers (0.2)",
    )
    facts.add_argument(
        "--vocabulary",
        choices=("heldout", "train"),
        default="heldout",
        help="phrasing, keys and filler: held out from training (default)",
    )
    facts.add_argument(
        "--phrasing",
        choices=("value-first", "grammar", "grammar-value-first"),
        help="state and ask the facts with this training phrasing instead of the "
        "vocabulary's (its keys and attributes too; the filler stays the vocabulary's): "
        "value-first: every statement "
        "gives the value before the key, in the training grammar's words (a diagnostic: "
        "can the model file a value under a key named after it?)",
    )
    facts.add_argument("--samples", type=int, default=8, help="streams per cell (8)")
    facts.add_argument("--seed", type=int, default=0, help="first probe seed (0)")
    facts.add_argument("--plot", type=Path, help="write accuracy plots to this PNG")
    facts.add_argument("--json", action="store_true", help="print one JSON object")
    facts.add_argument("--out", type=Path, help="also write the JSON report here")
    facts.set_defaults(func=run_facts)  # fmt: skip


def run_facts(args: argparse.Namespace) -> int:
    if args.samples < 1 or not 0 <= args.distractors <= 1:
        print("memsvc eval facts: --samples >= 1, --distractors in [0, 1]", file=sys.stderr)
        return 2
    if any(args.revised > n for n in args.facts):
        print("memsvc eval facts: --revised must not exceed any --facts", file=sys.stderr)
        return 2
    from memsvc.engine import StreamingEngine
    from memsvc.eval.facts import FactCell, evaluate_cell, result_dicts, summarize
    from memsvc.eval.options import load_eval_model
    from memsvc.model.io import model_hash

    model = load_eval_model(args)
    engine = StreamingEngine(model, use_memory=not args.no_memory)
    console = Console(stderr=True)
    results, cells = [], []
    started = time.perf_counter()
    for haystack in args.haystack:
        for length in args.lengths:
            for n in args.facts:
                for kind in args.values:
                    cell = FactCell(haystack, length, n, (kind,), args.revised, args.distractors,
                                    args.vocabulary, args.phrasing)  # fmt: skip
                    seeds = range(args.seed, args.seed + args.samples)
                    try:
                        got, stats = evaluate_cell(engine, cell, seeds, model.config.window)
                    except (ValueError, FileNotFoundError) as error:
                        print(f"memsvc eval facts: {error}", file=sys.stderr)
                        return 2
                    results += got
                    cells.append(_cell_row(cell, got, stats))
                    if not args.json:
                        row = cells[-1]
                        console.print(
                            f"{haystack} {length} tokens, {n} {kind} facts: "
                            f"{row['accuracy']:.1%} of {row['questions']} "
                            f"({row['updates_per_1k']:.1f} updates / 1k tokens)"
                        )
    report = {
        "model": str(args.model),
        "model_hash": model_hash(model),
        "memory": not args.no_memory,
        "memory_set": dict(args.memory_set),
        "vocabulary": args.vocabulary,
        "phrasing": args.phrasing or args.vocabulary,
        "distractors": args.distractors,
        "revised": args.revised,
        "seconds": round(time.perf_counter() - started, 1),
        "cells": cells,
        "summary": summarize(results, PHRASINGS[args.phrasing or args.vocabulary]),
        "results": result_dicts(results),
    }
    if args.plot:
        from memsvc.eval.plot import plot_results

        try:
            plot_results(results, args.plot, f"keyed facts: {Path(args.model).name}")
        except RuntimeError as error:
            print(f"memsvc eval facts: {error}", file=sys.stderr)
            return 2
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        print(text)
    else:
        Console().print(_table(cells))
        Console().print(_template_table(report["summary"]))
    return 0


def _cell_row(cell: FactCell, results: list, stats: StreamStats) -> dict:
    return {
        "haystack": cell.haystack,
        "length": cell.length,
        "facts": cell.n_facts,
        "values": list(cell.value_kinds),
        "revised": cell.revised,
        "questions": len(results),
        "accuracy": sum(r.correct for r in results) / len(results),
        "revised_accuracy": _share([r.correct for r in results if r.revised]),
        "other_key": _share([r.other_key for r in results]),
        "updates_per_1k": round(stats.updates_per_1k, 2),
        "write_share": round(stats.write_share, 4),
        "tokens_per_s": round(stats.tokens / max(stats.seconds, 1e-9)),
    }


def _share(values: list[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def _template_table(summary: dict) -> Table:
    table = Table(title="per template (statement, question, lead)")
    for name in ("part", "template", "exact", "questions"):
        table.add_column(name, justify="left" if name == "template" else "right")
    for part in ("statement", "question", "lead"):
        for row in summary[f"by_{part}"]:
            table.add_row(part, repr(row["key"]), f"{row['accuracy']:.1%}", str(row["n"]))
    return table


def _table(cells: list[dict]) -> Table:
    table = Table(title="keyed facts (exact match per fact)")
    columns = ("haystack", "length", "facts", "values", "questions", "exact", "other key",
               "updates/1k")  # fmt: skip
    for name in columns:
        table.add_column(name, justify="right")
    for row in cells:
        table.add_row(row["haystack"], str(row["length"]), str(row["facts"]),
                      ",".join(row["values"]), str(row["questions"]),
                      f"{row['accuracy']:.1%}", f"{row['other_key']:.1%}",
                      f"{row['updates_per_1k']:.1f}")  # fmt: skip
    return table
