"""`memsvc bench decode` measures every line in one run and reports the ratios."""

from __future__ import annotations

import json

import torch

from memsvc.bench.decode import flops_per_token
from memsvc.cli import main
from memsvc.memory import MemoryConfig
from memsvc.model import MAGModel, ModelConfig, save_model


def tiny() -> MAGModel:
    memory = MemoryConfig(
        dim=32, heads=2, depth=1, chunk_size=4, lookahead=True, update_rule="delta", optimizer="sgd"
    )
    torch.manual_seed(0)
    return MAGModel(ModelConfig(d_model=32, n_layers=1, window=8, memory=memory))


def test_bench_decode_reports_every_line_and_the_ratios(tmp_path, capsys) -> None:
    save_model(tiny(), tmp_path / "model")
    args = ["bench", "decode", "--model", str(tmp_path / "model"), "--tokens", "6"]
    args += ["--reference-tokens", "3", "--sessions", "1,3", "--history", "10"]
    code = main([*args, "--bulk-tokens", "16", "--repeats", "1", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in report["rates"]]
    assert names == [
        "reference generate (1 session)",
        "decode, 1 session",
        "decode, 3 sessions",
        "decode eager, 1 session",
        "bulk append",
    ]
    assert report["cpp_step"] == "built"  # the decode lines ran the C++ step
    rates = {r["name"]: r for r in report["rates"]}
    assert rates["decode, 3 sessions"]["items"] == 18  # every generation ran its full length
    assert all(r["per_s"] > 0 for r in report["rates"])
    one = rates["decode, 1 session"]["per_s"]
    ratios = report["ratios"]
    assert ratios["decode1_vs_reference"] == one / rates["reference generate (1 session)"]["per_s"]
    assert ratios["decode3_vs_decode1"] == rates["decode, 3 sessions"]["per_s"] / one
    assert ratios["decode1_vs_eager"] == one / rates["decode eager, 1 session"]["per_s"]
    assert report["floor_tokens_per_s"] > 0 and set(report["append_ms"]) == {"1", "64"}
    assert set(report["step_batch_ms"]) == {"64", "50@30"}


def test_flops_per_token_counts_the_gemms_attention_and_memory() -> None:
    model = tiny()
    cfg = model.config
    gemm = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    attention = 2 * 32 * (cfg.n_persistent + cfg.window + 1)
    memory = 3 * 2 * 16 * 16
    assert flops_per_token(model) == 2.0 * (gemm + attention + memory)
