"""`memsvc bench swap` measures evict / restore beside the disk's own write and read."""

from __future__ import annotations

import json
from pathlib import Path

from memsvc.cli import main


def test_bench_swap_reports_the_manager_beside_the_disk(tmp_path: Path, capsys) -> None:
    args = ["bench", "swap", "--windows", "16,64", "--repeats", "2", "--dir", str(tmp_path)]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["repeats"] == 2 and report["machine"]["device"] == "cpu"
    small, large = report["sizes"]
    assert (small["window"], large["window"]) == (16, 64)
    assert 0 < small["state_bytes"] < large["state_bytes"]
    for size in (small, large):
        assert size["file_bytes"] > size["state_bytes"]  # the header and the checksum
        for measured in ("evict", "restore", "disk_write", "disk_read"):
            assert 0 < size[f"{measured}_p50_ms"] <= size[f"{measured}_p99_ms"]
        share = size["disk_write_p50_ms"] / size["evict_p50_ms"]
        assert size["evict_share_of_disk_speed"] == share
    assert list(tmp_path.iterdir()) == []  # the scratch directory is gone
