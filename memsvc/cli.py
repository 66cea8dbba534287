"""`memsvc ...`: the command-line entry point. Each command lives in its own module;
this file only parses arguments and dispatches.

Building the parser imports no torch: every module that registers a command keeps its
heavy imports inside the command's handler, so `memsvc tenants ...`, `sessions`, `db`,
`top` and every `--help` start without paying for torch (tests/cli holds this).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from memsvc.bench.cli import add_bench_parser
from memsvc.client.cli import add_sessions_parser
from memsvc.client.demo import add_demo_parser
from memsvc.commands import CommandParser
from memsvc.corpus.cli import add_corpus_parser
from memsvc.eval.cli import add_eval_parser
from memsvc.obs.top_cli import add_top_parser
from memsvc.server.cli import add_serve_parser, add_tenants_parser
from memsvc.store.cli import add_db_parser


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="memsvc", description=__doc__)
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
    add_eval_parser(commands)
    add_bench_parser(commands)
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
