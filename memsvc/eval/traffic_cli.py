"""`memsvc eval traffic`: memory norm, norm growth, update rate and surprise over long streams
of every kind (held-out real text, synthetic, adversarial), and where the guards fire.

memsvc eval traffic --tokens 1m --out docs/traffic.json --plot docs/traffic.png
memsvc eval traffic --streams adversarial:random --memory-set max_step=8   # induced explosion
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from memsvc.eval.options import add_model_options, parse_length

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
        default=8.0,
        help="the guards' saturation bound in fresh-memory norms (8)",
    )
    traffic.add_argument(
        "--max-norm-growth",
        type=float,
        default=2.0,
        help="the guards' explosion threshold: norm ratio per window (2)",
    )
    traffic.add_argument(
        "--window-tokens", type=int, default=4096, help="the guards' window (4096)"
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
    from memsvc.eval.options import load_eval_model
    from memsvc.eval.traffic import run_stream, summarize_run
    from memsvc.model.io import model_hash
    from memsvc.obs.guard import GuardConfig

    model = load_eval_model(args)
    engine = StreamingEngine(model, use_memory=not args.no_memory)
    fresh = engine.append(engine.init_state(), [])[1].memory_norm
    guard = GuardConfig(
        norm_bound=args.norm_bound_factor * fresh,
        window_tokens=args.window_tokens,
        max_norm_growth=args.max_norm_growth,
    )
    runs, summaries = [], []
    for stream in args.streams:
        try:
            run = run_stream(engine, stream, args.tokens, guard, piece=args.piece, seed=args.seed)
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
    report = {
        "model": args.model,
        "model_hash": model_hash(model),
        "memory_set": dict(args.memory_set),
        "guard": {"norm_bound_factor": args.norm_bound_factor,
                  "max_norm_growth": args.max_norm_growth,
                  "window_tokens": args.window_tokens},
        "piece": args.piece,
        "summaries": summaries,
    }  # fmt: skip
    if args.out:
        full = {**report, "runs": [r.to_dict() for r in runs]}
        args.out.write_text(json.dumps(full) + "\n")
    if args.plot:
        _plot(runs, args.plot)
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
