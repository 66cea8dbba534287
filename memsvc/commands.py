"""The command line's parser class, and handlers imported only when their command runs.

A command module registers its parser with ``set_defaults(func=deferred("module:fn"))``:
parsing `memsvc ... --help` then never imports the module that does the work (and
with it torch, which costs seconds), while the handler is still named in one place.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any


def deferred(target: str) -> Callable[[argparse.Namespace], int]:
    """A handler that imports ``module:function`` on first call and runs it."""
    module_name, _, function_name = target.partition(":")

    def run(args: argparse.Namespace) -> int:
        module = importlib.import_module(module_name)
        return int(getattr(module, function_name)(args) or 0)

    run.__qualname__ = run.__name__ = f"deferred[{target}]"
    return run


def module_description(module_name: str) -> str | None:
    """A module's docstring, read from its source without running it (a command's
    `--help` shows the docstring of the module that implements it)."""
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        return None
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text()))


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser that shows every option's default in `--help`, at every depth
    (argparse makes subparsers of the parent's class, so one class covers them all)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        shown = action.help or ""
        if (
            action.option_strings
            and action.default is not None
            and action.default is not False  # a flag's "off" (0 and 0.0 are shown)
            and action.default != argparse.SUPPRESS
            and "%(default)" not in shown
        ):
            action.help = f"{shown} (default: %(default)s)".strip()
        return action
