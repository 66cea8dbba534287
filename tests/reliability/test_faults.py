"""The reliability suite's load and fault runs at CI size (seconds each, the tiny model):
private Redis and PostgreSQL, a real tmpfs, real processes killed with -9. The full-size
run is `memsvc bench reliability` (docs/RELIABILITY.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from memsvc.reliability import cli, scenarios

# What clients may see while each fault lasts, besides nothing at all.
ALLOWED_ERRORS = {
    "kill": set(),  # retried on the next owner, invisibly
    "redis": {"UNAVAILABLE"},  # a lease that cannot be proven while Redis is away
    "postgres": set(),  # appends need no SQL; checkpoints wait
    "disk": {"RESOURCE_EXHAUSTED"},
    "client": set(),
}


@pytest.mark.parametrize("name", sorted(scenarios.FAULTS))
def test_a_fault_loses_nothing_acknowledged(name: str, tmp_path: Path, model_dir: Path) -> None:
    report = scenarios.FAULTS[name](tmp_path, model_dir, seconds=3.0)
    assert report["acknowledged_tokens"] > 0 and report["acks_after_fault"] > 0
    assert report["lost_tokens"] == 0 and report["extra_tokens"] == 0
    assert report["states_checked"] > 0 and report["states_differing"] == 0
    assert report["diverged"] == 0
    assert set(report["errors_seen"]) <= ALLOWED_ERRORS[name], report
    if name == "disk":  # the disk really filled up, and the clients were told so
        assert report["errors_seen"].get("RESOURCE_EXHAUSTED", 0) > 0
    if name == "client":
        assert report["vanished_session"] == {
            "position": report["vanished_session"]["position"],
            "whole_appends": True,
            "appends_after": True,
        }


def test_load_reports_throughput_latency_and_memory(tmp_path: Path, model_dir: Path) -> None:
    report = scenarios.run_load(tmp_path, model_dir, clients=8, duration_s=4.0, piece_tokens=64)
    assert report["errors"] == {}
    assert report["tokens"] > 0 and report["tokens_per_s"] > 0
    assert 0 < report["ack_ms"]["p50"] <= report["ack_ms"]["p99"] <= report["ack_ms"]["max"]
    assert len(report["rss_mb"]) >= 3 and all(mb > 0 for _, mb in report["rss_mb"])
    verdict = report["verdict"]
    assert verdict["sessions"] == 8 and verdict["lost_tokens"] == 0
    assert verdict["states_differing"] == 0


def test_the_cli_names_every_fault() -> None:
    assert tuple(scenarios.FAULTS) == cli.FAULT_NAMES
