"""`memsvc eval niah`: needle-in-a-haystack accuracy by length, through the streaming engine.

memsvc eval niah --task passkey --lengths 1k,4k,16k,64k,256k,1m,2m --samples 8
memsvc eval niah --no-memory          # the sliding-window-only ablation
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from memsvc.eval.facts_cli import add_facts_parser
from memsvc.eval.keys import add_keys_parser
from memsvc.eval.options import add_model_options, parse_length
from memsvc.eval.suite import add_suite_parser
from memsvc.eval.traffic_cli import add_traffic_parser
from memsvc.train.haystack import HAYSTACKS

if TYPE_CHECKING:
    from memsvc.eval.niah import LengthResult


def add_niah_parser(evals: argparse._SubParsersAction) -> None:
    niah = evals.add_parser(
        "niah",
        help="needle-in-a-haystack recall by length (passkey, number, uuid)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(niah)
    niah.add_argument("--task", choices=("passkey", "number", "uuid"), default="passkey")
    niah.add_argument(
        "--lengths",
        type=lambda s: [parse_length(x) for x in s.split(",")],
        default="1k,4k,16k,64k",
        help="comma-separated token counts, k = 1024, m = 1048576 (1k,4k,16k,64k)",
    )
    niah.add_argument("--samples", type=int, default=8, help="probes per length (8)")
    niah.add_argument(
        "--max-tokens-per-length",
        type=parse_length,
        default=None,
        help="cap samples so one length streams at most this many tokens (e.g. 4m)",
    )
    niah.add_argument(
        "--haystack",
        choices=HAYSTACKS,
        default="sentences",
        help="synthetic filler, or real:<kind>: held-out corpus text (memsvc corpus build)",
    )
    niah.add_argument(
        "--vocabulary",
        choices=("heldout", "train"),
        default="heldout",
        help="haystack words: held out from training (default) or the training ones",
    )
    niah.add_argument(
        "--distractors", type=float, default=0.0, help="share of sentences carrying a number"
    )
    niah.add_argument("--seed", type=int, default=0, help="first probe seed")
    niah.add_argument(
        "--batch", type=int, default=1, help="probes streamed side by side (1: single stream)"
    )
    niah.add_argument("--json", action="store_true", help="print one JSON object")
    niah.set_defaults(func=run_niah)


def run_niah(args: argparse.Namespace) -> int:
    if args.samples < 1 or args.batch < 1:
        print("memsvc eval niah: --samples and --batch must be >= 1", file=sys.stderr)
        return 2
    from memsvc.engine import StreamingEngine
    from memsvc.eval.niah import evaluate_length
    from memsvc.eval.options import load_eval_model
    from memsvc.eval.probe import ProbeSpec
    from memsvc.model.io import model_hash

    model = load_eval_model(args)
    engine = StreamingEngine(model, use_memory=not args.no_memory)
    console = Console(stderr=True)
    rows: list[LengthResult] = []
    started = time.perf_counter()
    for length in args.lengths:
        samples = args.samples
        if args.max_tokens_per_length:
            samples = max(1, min(samples, args.max_tokens_per_length // length))
        spec = ProbeSpec(
            kind=args.task,
            length=length,
            window=model.config.window,
            haystack=args.haystack,
            vocabulary=args.vocabulary,
            distractor_rate=args.distractors,
        )
        seeds = range(args.seed, args.seed + samples)
        with _progress(console, not args.json) as progress:
            task = progress.add_task(f"{_label(length)} x{samples}", total=length * samples)
            row = evaluate_length(
                engine,
                spec,
                seeds,
                batch=args.batch,
                on_tokens=lambda n, task=task: progress.advance(task, n),
            )
        rows.append(row)
        if not args.json:
            console.print(
                f"{_label(length)}: {row.accuracy:.1%} exact ({row.samples} probes), "
                f"{row.tokens_per_s:,.0f} tok/s, peak RSS {row.peak_rss_mb:,.0f} MB"
            )
    report = {
        "model": str(args.model),
        "model_hash": model_hash(model),
        "task": args.task,
        "memory": not args.no_memory,
        "memory_set": dict(args.memory_set),
        "haystack": args.haystack,
        "vocabulary": args.vocabulary,
        "distractors": args.distractors,
        "batch": args.batch,
        "threads": args.threads,
        "seconds": round(time.perf_counter() - started, 1),
        "lengths": [row.to_dict() for row in rows],
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        Console().print(_table(report, rows))
    return 0


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f} tok"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=True,
    )


def _label(length: int) -> str:
    for unit, size in (("m", 1 << 20), ("k", 1 << 10)):
        if length % size == 0:
            return f"{length // size}{unit}"
    return str(length)


def _table(report: dict, rows: list[LengthResult]) -> Table:
    memory = "memory on" if report["memory"] else "NO memory (sliding window only)"
    table = Table(title=f"needle in a haystack: {report['task']}, {memory}")
    for name in ("length", "probes", "exact match", "chars right", "tok/s", "peak RSS MB"):
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(
            _label(row.length),
            str(row.samples),
            f"{row.accuracy:.1%}",
            f"{row.char_accuracy:.1%}",
            f"{row.tokens_per_s:,.0f}",
            f"{row.peak_rss_mb:,.0f}",
        )
    return table


def add_eval_parser(commands: argparse._SubParsersAction) -> None:
    """`memsvc eval ...`: every evaluation's parser (none imports the model until it runs)."""
    evaluate = commands.add_parser("eval", help="evaluations of a trained model")
    evals = evaluate.add_subparsers(dest="eval", required=True)
    for add in (
        add_niah_parser,
        add_facts_parser,
        add_keys_parser,
        add_traffic_parser,
        add_suite_parser,
    ):
        add(evals)
