"""The committed generated code is what the contract generates, and the contract is documented."""

from __future__ import annotations

import re
from pathlib import Path

from memsvc.proto.generate import OUTPUT_DIR, PROTO_ROOT, generate


def test_regenerating_the_proto_changes_nothing(tmp_path: Path) -> None:
    fresh = {path.name: path.read_bytes() for path in generate(tmp_path)}
    committed = {path.name: path.read_bytes() for path in OUTPUT_DIR.iterdir() if path.is_file()}
    assert sorted(committed) == sorted(fresh), "files differ: run scripts/gen-proto"
    for name, content in fresh.items():
        assert committed[name] == content, f"{name} is stale: run scripts/gen-proto"


def test_every_field_rpc_and_enum_value_is_documented() -> None:
    """A comment on the line above each declaration, or at the end of its line."""
    lines = (PROTO_ROOT / "memsvc" / "v1" / "memsvc.proto").read_text().splitlines()
    declaration = re.compile(r"\s+(rpc \w+\(|(optional |repeated )?[\w.<>, ]*\w+ = \d+;)")
    undocumented = [
        f"{i + 1}: {line.strip()}"
        for i, line in enumerate(lines)
        if declaration.match(line)
        and "//" not in line
        and not lines[i - 1].strip().startswith("//")
    ]
    assert not undocumented, "undocumented declarations:\n" + "\n".join(undocumented)
