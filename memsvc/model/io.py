"""A model on disk is a directory: `config.json` + `model.safetensors`.

`model_hash` is a sha256 over the canonical config JSON and every weight
(name, dtype, shape, bytes in name order). It is the same for a model in
memory and for the directory it was saved to, so sessions can pin it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from memsvc.model.config import ModelConfig
from memsvc.model.model import MAGModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_model(model: MAGModel, directory: str | os.PathLike[str]) -> Path:
    """Write the model's config and weights into `directory` (created if missing).
    Each file is written under a temporary name and renamed into place."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path / (WEIGHTS_FILE + ".tmp")
    save_file(weights, tmp, metadata={"format": "pt"})
    os.replace(tmp, path / WEIGHTS_FILE)
    tmp = path / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(model.config.to_dict(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path / CONFIG_FILE)
    return path


def load_config(directory: str | os.PathLike[str]) -> ModelConfig:
    return ModelConfig.from_dict(json.loads((Path(directory) / CONFIG_FILE).read_text()))


def load_model(directory: str | os.PathLike[str], device: torch.device | str = "cpu") -> MAGModel:
    """The model saved in `directory`, in eval mode; missing or extra weights are errors."""
    model = MAGModel(load_config(directory))
    model.load_state_dict(load_file(Path(directory) / WEIGHTS_FILE), strict=True)
    return model.to(device).eval()


def model_hash(model_or_dir: MAGModel | str | os.PathLike[str]) -> str:
    """sha256 (hex) of a model's config and weights, from memory or from its directory."""
    if isinstance(model_or_dir, MAGModel):
        config = model_or_dir.config
        weights = model_or_dir.state_dict()
    else:
        config = load_config(model_or_dir)
        weights = load_file(Path(model_or_dir) / WEIGHTS_FILE)
    h = hashlib.sha256(b"memsvc-mag-model-v1\0")
    h.update(json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(weights):
        tensor: Tensor = weights[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
