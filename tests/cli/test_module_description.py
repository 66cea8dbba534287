"""`memsvc.commands.source_docstring` (a command's `--help` text, read without
`ast.parse`) against `ast.get_docstring`, its obviously right reference."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import memsvc
from memsvc.commands import module_description, source_docstring

SOURCES = sorted(Path(memsvc.__file__).parent.rglob("*.py"))


def test_every_module_of_the_package_gives_what_ast_gives() -> None:
    assert len(SOURCES) > 100
    for path in SOURCES:
        source = path.read_text()
        assert source_docstring(source) == ast.get_docstring(ast.parse(source)), path


@pytest.mark.parametrize(
    "source",
    [
        "",
        "# only a comment\n",
        "x = 1\n",
        "'''single quotes,\n    indented.\n    '''\n",
        '#!/usr/bin/env python\n# -*- coding: utf-8 -*-\n\n"""After comments."""\n',
        'r"""Raw \\d+ text."""\n',
        '"""Escapes: \\t tab, \\u00e9, and \\\\."""\n',
        'b"""bytes are not a docstring"""\n',
        '"""Not alone.""".strip()\n',
        '"""Two """ "literals."\n',
        '"""Then a statement."""; x = 1\n',
        'f"An f-string {1}"\n',
    ],
)
def test_edge_cases_give_what_ast_gives(source: str) -> None:
    assert source_docstring(source) == ast.get_docstring(ast.parse(source))


def test_a_command_module_and_a_missing_one() -> None:
    assert module_description("memsvc.obs.top").startswith("`memsvc top`")
    assert module_description("memsvc.no_such_module") is None
