"""`memsvc ...`: the command-line entry point. Each command lives in its own module;
this file only parses arguments and dispatches."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from memsvc.bench.decode import add_decode_bench_parser
from memsvc.bench.serve import add_serve_bench_parser
from memsvc.bench.swap import add_swap_bench_parser
from memsvc.client.cli import add_sessions_parser
from memsvc.client.demo import add_demo_parser
from memsvc.corpus.cli import add_corpus_parser
from memsvc.eval.cli import add_niah_parser
from memsvc.eval.facts_cli import add_facts_parser
from memsvc.eval.suite import add_suite_parser
from memsvc.eval.traffic_cli import add_traffic_parser
from memsvc.obs.top import add_top_parser
from memsvc.reliability.cli import add_reliability_parser
from memsvc.server.cli import add_serve_parser, add_tenants_parser
from memsvc.store.cli import add_db_parser


def _bench_lmm(args: argparse.Namespace) -> int:
    from memsvc.bench.lmm import run_lmm_benchmark

    return run_lmm_benchmark(
        dims=args.dims,
        tokens=args.tokens,
        stream_tokens=args.stream_tokens,
        repeats=args.repeats,
        threads=args.threads,
        peer=not args.no_peer,
        as_json=args.json,
        optimizer=args.optimizer,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memsvc", description=__doc__)
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error")
    parser.add_argument("--log-json", action="store_true", default=None, help="JSON log lines")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("train", help="train a MAG model (see `memsvc train --help`)")
    add_serve_parser(commands)
    add_demo_parser(commands)
    add_tenants_parser(commands)
    add_sessions_parser(commands)
    add_top_parser(commands)
    add_db_parser(commands)
    add_corpus_parser(commands)

    evaluate = commands.add_parser("eval", help="evaluations of a trained model")
    evals = evaluate.add_subparsers(dest="eval", required=True)
    add_niah_parser(evals)
    add_facts_parser(evals)
    add_traffic_parser(evals)
    add_suite_parser(evals)

    bench = commands.add_parser("bench", help="benchmarks that print their peer beside them")
    benches = bench.add_subparsers(dest="bench", required=True)
    lmm = benches.add_parser(
        "lmm", help="memory streaming throughput vs titans-pytorch 0.5.5 (same run)"
    )
    lmm.add_argument("--dims", type=lambda s: [int(d) for d in s.split(",")], default=[256, 512])
    lmm.add_argument("--tokens", type=int, default=4096, help="tokens per 64-token-chunk run")
    lmm.add_argument("--stream-tokens", type=int, default=256, help="tokens fed one at a time")
    lmm.add_argument("--repeats", type=int, default=5)
    lmm.add_argument("--threads", type=int, default=2)
    lmm.add_argument("--no-peer", action="store_true", help="skip titans-pytorch")
    lmm.add_argument("--json", action="store_true", help="print one JSON object")
    lmm.add_argument(
        "--optimizer",
        default="momentum",
        choices=["momentum", "chunk_momentum", "sgd"],
        help="our inner optimiser (chunk_momentum is titans-pytorch's recurrence)",
    )
    lmm.set_defaults(func=_bench_lmm)
    add_serve_bench_parser(benches)
    add_decode_bench_parser(benches)
    add_swap_bench_parser(benches)
    add_reliability_parser(benches)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from memsvc.obs.logging import configure_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # the trainer owns its flags (and torchrun runs it directly)
        from memsvc.train.cli import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_json)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
