"""`memsvc bench lmm` runs both implementations on the same work and reports both."""

from __future__ import annotations

import json

import pytest
import torch
from torch.profiler import profile

from memsvc.bench.lmm import bench_memory
from memsvc.bench.lmm_floor import chunk_products, product_flops
from memsvc.bench.titans_peer import build_titans_memory, stream_titans
from memsvc.cli import main


def test_bench_lmm_reports_ours_and_the_peer(capsys) -> None:
    code = main(
        [
            "bench",
            "lmm",
            "--dims",
            "32",
            "--tokens",
            "128",
            "--stream-tokens",
            "4",
            "--repeats",
            "1",
            "--json",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert [(c["dim"], c["segment"]) for c in report["configs"]] == [(32, 64), (32, 1)]
    for c in report["configs"]:
        ours, peer = c["memsvc"], c["titans_pytorch"]
        assert ours["tok_per_s"] > 0 and peer["tok_per_s"] > 0
        assert c["ratio"] == ours["tok_per_s"] / peer["tok_per_s"]
        assert ours["state_bytes"] > 0 and peer["state_bytes"] > 0
        assert ours["peak_bytes"] > 0
    floor = report["configs"][0]
    assert floor["gemm_floor_tok_per_s"] > 0
    assert (
        floor["floor_vs_peer"]
        == floor["gemm_floor_tok_per_s"] / floor["titans_pytorch"]["tok_per_s"]
    )
    assert report["configs"][1]["gemm_floor_tok_per_s"] is None  # 1-token calls: no floor


def test_the_peer_really_streams_with_its_state_carried() -> None:
    torch.manual_seed(0)
    memory = build_titans_memory(32, chunk_size=8).eval()
    x = torch.randn(1, 64, 32)
    with torch.no_grad():
        whole, _ = memory(x)
        pieces, _ = stream_titans(memory, x, segment=8)
    torch.testing.assert_close(pieces, whole, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["momentum", "chunk_momentum", "sgd"])
def test_the_gemm_floor_times_the_products_a_call_really_runs(optimizer: str) -> None:
    """The floor's products carry the FLOPs the profiler counts in the matrix products
    (mm, addmm, bmm) of one 64-token call of the benchmark's memory, within 1% (the gate
    projection and the C x C einsums are left out)."""
    memory = bench_memory(64, optimizer)
    x = torch.randn(1, 128, 64)
    with torch.no_grad():
        _, state = memory(x[:, :64])
        with profile(with_flops=True) as prof:
            memory(x[:, 64:], state)
    counted = sum(
        e.flops for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::bmm")
    )
    floor = product_flops(chunk_products(64, 4.0, 64, optimizer))
    assert abs(floor - counted) / counted < 0.01, (floor, counted)
