"""The MAG model: tokenizer, config, sliding-window attention, MAG blocks, save / load."""

from memsvc.model.attention import AttentionCache, SlidingWindowAttention
from memsvc.model.config import ModelConfig
from memsvc.model.io import load_model, model_hash, save_model
from memsvc.model.mag import BlockState, MAGBlock
from memsvc.model.model import MAGModel, ModelState

__all__ = [
    "AttentionCache",
    "BlockState",
    "MAGBlock",
    "MAGModel",
    "ModelConfig",
    "ModelState",
    "SlidingWindowAttention",
    "load_model",
    "model_hash",
    "save_model",
]
