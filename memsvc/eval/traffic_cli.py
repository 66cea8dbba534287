"""`memsvc eval traffic`: memory norm, norm growth, update rate and surprise over long streams
of every kind (held-out real text, synthetic, adversarial), and where the guards fire.

memsvc eval traffic --tokens 1m --out docs/traffic.json --plot docs/traffic.png
memsvc eval traffic --streams adversarial:random --memory-set max_step=8   # induced explosion
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

from memsvc.eval.options import add_model_options, parse_length
from memsvc.obs.thresholds import CALIBRATION_FILE, NORM_BOUND_FACTOR

DEFAULT_STREAMS = (
    "sentences",
    "real:english",
    "real:chinese",
    "real:german",
    "real:japanese",
    "real:code",
    "real:json",
    "real:logs",
    "adversarial:random",
    "adversarial:repeat",
)


def _streams(text: str) -> list[str]:
    from memsvc.eval.traffic import STREAMS  # parsing this flag means the model will run

    names = [x for x in text.split(",") if x]
    for name in names:
        if name not in STREAMS:
            raise argparse.ArgumentTypeError(f"unknown stream {name!r} ({', '.join(STREAMS)})")
    return names


def add_traffic_parser(evals: argparse._SubParsersAction) -> None:
    traffic = evals.add_parser(
        "traffic",
        help="memory norm, growth, update rate and surprise over long streams; guard firings",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(traffic)
    traffic.add_argument(
        "--streams",
        type=_streams,
        default=",".join(DEFAULT_STREAMS),
        help="comma-separated streams (default: every real kind, synthetic "
        "sentences and both adversarial ones)",
    )
    traffic.add_argument("--tokens", type=parse_length, default="1m", help="per stream (1m)")
    traffic.add_argument("--piece", type=int, default=1024, help="tokens per append (1024)")
    traffic.add_argument(
        "--norm-bound-factor",
        type=float,
        help="the guards' saturation bound in fresh-memory norms (default: the model's "
        f"{CALIBRATION_FILE}, else {NORM_BOUND_FACTOR:g})",
    )
    traffic.add_argument(
        "--max-norm-growth",
        type=float,
        help="the guards' explosion threshold, norm ratio per window (default: the "
        f"model's {CALIBRATION_FILE}, else 2)",
    )
    traffic.add_argument(
        "--split",
        choices=("heldout", "train"),
        default="heldout",
        help="text sources and vocabulary: held-out (to verify) or training (to calibrate)",
    )
    traffic.add_argument(
        "--calibrate",
        type=Path,
        help=f"write guard thresholds measured on these streams here (a model's "
        f"{CALIBRATION_FILE}; use --split train); the norm guards stay off meanwhile",
    )
    traffic.add_argument(
        "--window-tokens", type=int, default=4096, help="the guards' window (4096)"
    )
    traffic.add_argument(
        "--recall-probes",
        type=int,
        default=0,
        help="per stream, this many passkeys streamed before --recall-tokens of it and "
        "asked after, guarded and unguarded: does a mitigation keep what was written?",
    )
    traffic.add_argument(
        "--recall-tokens", type=parse_length, default="16k", help="see --recall-probes"
    )
    traffic.add_argument("--seed", type=int, default=0)
    traffic.add_argument("--out", type=Path, help="write the JSON report (every sample) here")
    traffic.add_argument("--plot", type=Path, help="write the norm trajectories to this PNG")
    traffic.set_defaults(func=run_traffic)  # fmt: skip


def run_traffic(args: argparse.Namespace) -> int:
    if args.piece < 1 or args.tokens <= args.piece:
        print("memsvc eval traffic: need 1 <= --piece < --tokens", file=sys.stderr)
        return 2
    from memsvc.engine import StreamingEngine
    from memsvc.eval.calibration import calibrate
    from memsvc.eval.mitigation import recall_through
    from memsvc.eval.options import load_eval_model
    from memsvc.eval.traffic import run_stream, summarize_run
    from memsvc.model.io import model_hash
    from memsvc.obs.thresholds import default_guard_config, read_calibration

    model = load_eval_model(args)
    engine = StreamingEngine(model, use_memory=not args.no_memory)
    overrides = {"window_tokens": args.window_tokens}
    if args.max_norm_growth is not None:
        overrides["max_norm_growth"] = args.max_norm_growth
    calibration = read_calibration(args.model)
    if args.norm_bound_factor is not None:
        calibration["norm_bound_factor"] = args.norm_bound_factor
    guard = default_guard_config(engine, calibration, **overrides)
    if args.calibrate:  # measure the model as it is: no mitigation may bend the trajectories
        guard = replace(guard, norm_bound=math.inf, max_norm_growth=math.inf)
    runs, summaries = [], []
    for stream in args.streams:
        try:
            run = run_stream(
                engine, stream, args.tokens, guard, piece=args.piece, seed=args.seed,
                split=args.split,
            )  # fmt: skip
        except FileNotFoundError as error:
            print(f"memsvc eval traffic: {error}", file=sys.stderr)
            return 2
        runs.append(run)
        summaries.append(summarize_run(run, args.window_tokens))
        s = summaries[-1]
        print(
            f"{stream:20} norm/fresh p50 {s['norm_ratio'].get('p50', 0):6.2f} "
            f"max {s['norm_ratio'].get('p100', 0):6.2f}  growth/window max "
            f"{s['norm_growth_per_window'].get('p100', 0):5.2f}  updates/1k "
            f"{s['updates_per_1k']:5.1f}  mitigations {len(s['mitigations'])} "
            f"(first at {s['first_mitigation_at']})",
            flush=True,
        )
    recall = []
    for stream in args.streams if args.recall_probes > 0 else ():
        seeds = range(args.seed, args.seed + args.recall_probes)
        through = recall_through(engine, stream, args.recall_tokens, guard, seeds)
        recall.append(asdict(through))
        print(
            f"{stream:20} passkey after {args.recall_tokens} tokens: guarded "
            f"{through.guarded:.0%}, unguarded {through.unguarded:.0%} "
            f"({through.mitigations:.1f} mitigations per probe)",
            flush=True,
        )
    report = {
        "model": str(args.model),
        "model_hash": model_hash(model),
        "memory_set": dict(args.memory_set),
        "guard": asdict(guard),
        "split": args.split,
        "piece": args.piece,
        "summaries": summaries,
        "recall_through": recall,
    }  # fmt: skip
    if args.out:
        full = {**report, "runs": [r.to_dict() for r in runs]}
        args.out.write_text(json.dumps(full) + "\n")
    if args.plot:
        _plot(runs, args.plot)
    if args.calibrate:
        thresholds = calibrate(summaries, guard.saturation_fraction)
        args.calibrate.write_text(json.dumps(thresholds, indent=1) + "\n")
        print(f"guard thresholds written to {args.calibrate}: {thresholds}", flush=True)
    print(json.dumps(report["summaries"], indent=1))
    return 0


def _plot(runs: list, path: Path) -> None:
    from memsvc.eval.plot import pyplot

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(9, 4.5))
    for run in runs:
        xs = [s.position for s in run.samples]
        ys = [s.memory_norm / max(run.fresh_norm, 1e-12) for s in run.samples]
        axis.plot(xs, ys, label=run.stream, linewidth=1)
    axis.set_xscale("log")
    axis.set_xlabel("tokens streamed")
    axis.set_ylabel("memory norm / fresh memory norm")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
