"""Imports go one way between the packages named here (a cycle makes a reader chase a
call back up the stack): obs is below train and eval, and imports neither."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "memsvc"

# package -> packages of memsvc it must not import (directly or inside functions)
FORBIDDEN = {
    "obs": ("memsvc.train", "memsvc.eval"),
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_downwards(package: str) -> None:
    offenders = [
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in sorted((PACKAGE / package).rglob("*.py"))
        for name in _imports(path)
        if name.startswith(FORBIDDEN[package])
    ]
    assert offenders == []


def _top_level_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_the_demo_is_a_client_of_the_service() -> None:
    """`memsvc demo` talks to its server through the SDK, as a user's program would; it
    imports the server's modules only inside `run_demo`, to start the process."""
    inside = ("memsvc.server", "memsvc.sessions", "memsvc.store", "memsvc.train")
    imported = _top_level_imports(PACKAGE / "client" / "demo.py")
    assert "memsvc.client" in imported
    assert [name for name in imported if name.startswith(inside)] == []
