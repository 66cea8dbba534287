"""A model directory round trips exactly; its hash pins config and weights."""

from __future__ import annotations

import json

import pytest
import torch

from memsvc.model import ModelConfig, load_model, model_hash, save_model
from memsvc.model.io import CONFIG_FILE, WEIGHTS_FILE

from .conftest import small_config, small_model


def test_config_json_round_trip() -> None:
    cfg = small_config(window=16, memory_residual=False)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_dict(data) == cfg
    assert isinstance(data["memory"], dict) and data["memory"]["chunk_size"] == 4
    assert ModelConfig().memory.dim == ModelConfig().d_model  # default memory follows d_model
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**data, "surprise": 1})
    with pytest.raises(ValueError, match=r"memory\.dim"):
        ModelConfig(d_model=64, memory=small_config().memory)


def test_save_load_is_exact(tmp_path) -> None:
    model = small_model(0, dtype=torch.float32)
    path = save_model(model, tmp_path / "m")
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    loaded = load_model(path)
    assert loaded.config == model.config and not loaded.training
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    tokens = torch.randint(0, 256, (2, 21))
    torch.testing.assert_close(loaded(tokens)[0], model(tokens)[0], rtol=0, atol=0)


def test_hash_is_stable_and_pins_weights_and_config(tmp_path) -> None:
    model = small_model(1, dtype=torch.float32)
    digest = model_hash(model)
    assert len(digest) == 64
    save_model(model, tmp_path / "a")
    save_model(load_model(tmp_path / "a"), tmp_path / "b")
    assert model_hash(tmp_path / "a") == model_hash(tmp_path / "b") == digest

    with torch.no_grad():  # one weight, one ulp
        w = model.blocks[1].ffn.down.weight
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(float("inf")))
    assert model_hash(model) != digest

    # same weights, different config (RoPE base changes no tensor shape)
    other = small_model(1, dtype=torch.float32, rope_base=500.0)
    other.load_state_dict(load_model(tmp_path / "a").state_dict())
    assert model_hash(other) != digest


def test_load_rejects_weights_that_do_not_fit(tmp_path) -> None:
    save_model(small_model(2, dtype=torch.float32), tmp_path / "m")
    config = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    config["n_persistent"] = 3
    (tmp_path / "m" / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="persistent"):
        load_model(tmp_path / "m")
