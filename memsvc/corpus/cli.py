"""`memsvc corpus build | info`: the real-text corpus for training and evaluation.

scripts/corpus-deps                  # install the sources (Debian packages, Faker)
memsvc corpus build                  # -> $MEMSVC_CORPUS_DIR or ~/.cache/memsvc/corpus
memsvc corpus info
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from memsvc.corpus.reader import default_corpus_dir
from memsvc.corpus.sources import KINDS


def _bytes(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1 << 10, "m": 1 << 20}.get(text[-1:], 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"bad size {text!r}: a whole number, k or m")
    return int(digits) * scale


def add_corpus_parser(commands: argparse._SubParsersAction) -> None:
    corpus = commands.add_parser(
        "corpus",
        help="the real-text corpus (build, info)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = corpus.add_subparsers(dest="corpus_action", required=True)
    build = actions.add_parser(
        "build",
        help="gather the corpus from this machine's packages",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    build.add_argument("--out", type=Path, default=default_corpus_dir(), help="directory")
    build.add_argument(
        "--kinds", default=",".join(KINDS), help="comma-separated kinds to (re)build"
    )
    build.add_argument("--train-bytes", type=_bytes, default="4m", help="per kind")
    build.add_argument("--eval-bytes", type=_bytes, default="2m", help="per kind")
    build.set_defaults(func=_run_build)
    info = actions.add_parser(
        "info",
        help="what a built corpus holds",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    info.add_argument("--dir", type=Path, default=default_corpus_dir(), help="directory")
    info.set_defaults(func=_run_info)


def _run_build(args: argparse.Namespace) -> int:
    from memsvc.corpus.build import MissingSourceError, build_corpus

    kinds = [k for k in args.kinds.split(",") if k]
    try:
        manifest = build_corpus(
            args.out, kinds, {"train": args.train_bytes, "eval": args.eval_bytes}
        )
    except (MissingSourceError, ValueError) as error:
        print(f"memsvc corpus build: {error}", file=sys.stderr)
        return 2
    _print(manifest)
    print(f"corpus written to {args.out.resolve()}")
    return 0


def _run_info(args: argparse.Namespace) -> int:
    path = args.dir / "manifest.json"
    if not path.is_file():
        print(f"memsvc corpus info: no corpus at {args.dir} (memsvc corpus build)", file=sys.stderr)
        return 2
    _print(json.loads(path.read_text()))
    return 0


def _print(manifest: dict) -> None:
    for kind, splits in manifest["kinds"].items():
        for split, report in splits.items():
            sources = ", ".join(f"{name} {n}" for name, n in report["sources"].items())
            size = f"{report['bytes']:>9,} bytes  {report['documents']:>5} docs"
            print(f"{kind:9} {split:5} {size}  {sources}")
