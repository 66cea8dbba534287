"""The command line's parser class, and handlers imported only when their command runs.

A command module registers its parser with ``set_defaults(func=deferred("module:fn"))``:
parsing `memsvc ... --help` then never imports the module that does the work (and
with it torch, which costs seconds), while the handler is still named in one place.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import io
import tokenize
from collections.abc import Callable
from pathlib import Path
from typing import Any

_SKIPPED = {tokenize.ENCODING, tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE}


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
    return source_docstring(Path(spec.origin).read_text())


def source_docstring(source: str) -> str | None:
    """The docstring of module source `source`, cleaned as `ast.get_docstring` cleans it.

    Read with `tokenize` and the literal compiled alone, not with `ast.parse`: CPython
    3.11.7 (this machine's) raised "AST constructor recursion depth mismatch" in CI when
    a server thread formatted a traceback (3.11 parses the failing line to place its ^^^
    markers) while a test built the `memsvc` parser: building AST objects in two
    threads at once is not safe there."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    parts, end = [], None
    for token in tokens:
        if token.type == tokenize.STRING:
            parts.append(token.string)  # adjacent literals are one string
        elif token.type not in _SKIPPED or (parts and token.type == tokenize.NEWLINE):
            end = token
            break
    if not parts or end is None or end.string not in ("", "\n", ";"):
        return None  # no leading string, or one that is part of a larger expression
    for part in parts:
        prefix = part[: len(part) - len(part.lstrip("rRuUbBfF"))]
        if set(prefix.lower()) & {"b", "f"}:  # bytes or an f-string: not a docstring
            return None
    value = eval(compile(" ".join(parts), "<docstring>", "eval"), {"__builtins__": {}})
    return inspect.cleandoc(value)


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
