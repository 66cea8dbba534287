"""kernels/ depends on nothing in memsvc: the dependency runs one way, memsvc -> kernels."""

from __future__ import annotations

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[2] / "kernels"


def memsvc_imports(path: Path) -> list[str]:
    """Every `import memsvc...` / `from memsvc... import` in a file, top level or nested."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        found += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] == "memsvc"]
    return found


def test_the_walker_sees_both_import_forms(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import memsvc.memory\ndef f():\n    from memsvc import cli\nimport memsvcx\n")
    assert memsvc_imports(probe) == ["probe.py:1 memsvc.memory", "probe.py:3 memsvc"]


def test_kernels_import_nothing_from_memsvc() -> None:
    files = sorted(KERNELS.rglob("*.py"))
    assert len(files) >= 8
    offending = [hit for path in files for hit in memsvc_imports(path)]
    assert offending == []
