"""`--help` shows every option's default, at every depth of `memsvc`."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator

import pytest

from memsvc.cli import build_parser
from memsvc.train.cli import build_parser as build_train_parser


def _parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, (*path, name))


def test_every_default_is_in_the_help() -> None:
    missing = []
    checked = 0
    trees = [*_parsers(build_parser()), *_parsers(build_train_parser(), ("train",))]
    for path, parser in trees:
        formatter = parser._get_formatter()
        for action in parser._actions:
            shown = action.default is not None and action.default is not False
            if not action.option_strings or not shown or action.default == argparse.SUPPRESS:
                continue
            checked += 1
            if f"(default: {action.default})" not in formatter._expand_help(action):
                missing.append((" ".join(path), action.option_strings[0]))
        parser.format_help()  # every help string expands
    assert checked > 80
    assert missing == []
    serve = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    assert "(default: 0)" in " ".join(serve.split())  # --metrics-port, off


def test_the_metrics_port_is_off_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEMSVC_METRICS_PORT", raising=False)
    assert build_parser().parse_args(["serve"]).metrics_port == 0
    monkeypatch.setenv("MEMSVC_METRICS_PORT", "9999")
    assert build_parser().parse_args(["serve"]).metrics_port == 9999
    args = build_parser().parse_args(["serve", "--metrics-port", "9464"])
    assert args.metrics_port == 9464
    assert "MEMSVC_METRICS_PORT" in os.environ
