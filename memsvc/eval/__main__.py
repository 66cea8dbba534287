"""`python -m memsvc.eval facts ...`: the same as `memsvc eval facts ...`, without the
other commands' imports (gRPC, SQL, Redis), for a machine that has only torch and a few
wheels (a lent GPU: scripts/gpu-session)."""

from __future__ import annotations

import argparse
import sys

from memsvc.eval.cli import add_eval_parser
from memsvc.obs.logging import configure_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memsvc.eval")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    configure_logging("info", json=True)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
