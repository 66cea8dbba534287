"""`memsvc bench lmm` runs both implementations on the same work and reports both."""

from __future__ import annotations

import json

import torch

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


def test_the_peer_really_streams_with_its_state_carried() -> None:
    torch.manual_seed(0)
    memory = build_titans_memory(32, chunk_size=8).eval()
    x = torch.randn(1, 64, 32)
    with torch.no_grad():
        whole, _ = memory(x)
        pieces, _ = stream_titans(memory, x, segment=8)
    torch.testing.assert_close(pieces, whole, rtol=1e-4, atol=1e-5)
