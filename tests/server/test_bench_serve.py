"""`memsvc bench serve` on the tiny model: both paths measured, in one JSON report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memsvc.cli import main


def test_bench_serve_reports_both_paths(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "serve", "--model", str(model_dir), "--sessions", "1,3"]
    argv += ["--tokens-per-session", "256", "--append-tokens", "128", "--repeats", "3", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert [row["sessions"] for row in report["rows"]] == [1, 3]
    for row in report["rows"]:
        ratios = row["grpc_vs_engine_per_repeat"]
        assert len(ratios) == 3 and row["grpc_vs_engine"] == sorted(ratios)[1]
        for path in ("engine", "grpc"):
            assert row[path]["tokens"] == row["sessions"] * 256
            assert row[path]["tok_per_s"] > 0
            assert 0 < row[path]["p50_ms"] <= row[path]["p99_ms"]
    assert report["goals"]["single_session_grpc_vs_engine"]["goal"] == 0.8
    assert "grpc_32_vs_1_sessions" not in report["goals"]  # 32 sessions were not run
    fsync = report["disk_fsync_ms"]  # the disk's part of an acknowledgement, beside it
    assert 0 < fsync["p50"] <= fsync["p99"]


def test_bench_serve_neighbour_reports_b_alone_and_beside_a(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "serve", "--neighbour", "--model", str(model_dir), "--threads", "1"]
    argv += ["--bulk-tokens", "8192", "--bulk-append-tokens", "2048", "--generate-tokens", "500"]
    argv += ["--b-appends", "4", "--query-deadline", "0.3", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    b = report["b"]
    assert b["sessions"] == 8 and b["appends"] == 32 and b["append_tokens"] == 64
    for side in ("alone", "beside_a"):
        assert 0 < b[side]["p50_ms"] <= b[side]["p99_ms"]
    ratio = report["goals"]["b_p99_beside_vs_alone"]
    assert ratio["value"] == pytest.approx(b["beside_a"]["p99_ms"] / b["alone"]["p99_ms"])
    assert ratio["goal"] == 2.0
    assert report["goals"]["abandoned_query_stop_s"]["value"] >= 0


def test_bench_serve_generate_reports_both_paths(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "serve", "--generate", "--model", str(model_dir), "--threads", "1"]
    argv += ["--sessions", "1,3", "--generate-tokens", "40", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert [row["sessions"] for row in report["rows"]] == [1, 3]
    for row in report["rows"]:
        for path in ("engine", "grpc"):  # EOS off: every stream runs its full length
            assert row[path]["tokens"] == row["sessions"] * 40
            assert row[path]["tok_per_s"] > 0
        assert row["grpc_vs_1"] == pytest.approx(
            row["grpc"]["tok_per_s"] / report["rows"][0]["grpc"]["tok_per_s"]
        )
    assert "grpc_32_vs_1_generations" not in report["goals"]  # 32 were not run
    # Both paths were measured on the C++ decode step (the server's read from its log).
    assert report["decode_step"] == {"engine": "cpp", "server": "cpp"}
