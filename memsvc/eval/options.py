"""Options every `memsvc eval` command shares: the model, its memory knobs, threads."""

from __future__ import annotations

import argparse
from dataclasses import fields, replace
from typing import TYPE_CHECKING

from memsvc.settings import MODEL_HELP, model_dir

if TYPE_CHECKING:
    from memsvc.model import MAGModel

# Inference-time knobs of the memory: they change no parameter, so a trained model can be
# evaluated with the write gate or adaptive forgetting switched on (an ablation).
# max_step raised far above what the model was trained with is an induced update explosion.
OVERRIDABLE = (
    "tau",
    "gate",
    "surprise_beta",
    "adaptive_forgetting",
    "lambda_0",
    "lambda_max",
    "max_step",
)


def parse_length(text: str) -> int:
    """'4096', '4k' (4096), '1m' (1048576)."""
    text = text.strip().lower()
    scale = {"k": 1 << 10, "m": 1 << 20}.get(text[-1:], 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit() or int(digits) == 0:
        raise ValueError(f"bad length {text!r}: use a positive integer with an optional k or m")
    return int(digits) * scale


def parse_override(text: str) -> tuple[str, float | bool | str]:
    name, sep, raw = text.partition("=")
    if not sep or name not in OVERRIDABLE:
        raise argparse.ArgumentTypeError(
            f"bad --memory-set {text!r}: NAME=VALUE with NAME one of {', '.join(OVERRIDABLE)}"
        )
    from memsvc.memory import MemoryConfig  # parsing this flag means the model will run

    kind = {f.name: f.type for f in fields(MemoryConfig)}[name]
    if kind in (bool, "bool"):
        if raw.lower() not in ("true", "false", "1", "0"):
            raise argparse.ArgumentTypeError(f"{name} takes true or false, not {raw!r}")
        return name, raw.lower() in ("true", "1")
    if name == "gate":
        if raw not in ("absolute", "relative"):
            raise argparse.ArgumentTypeError(f"gate takes absolute or relative, not {raw!r}")
        return name, raw
    try:
        return name, float(raw)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{name} takes a number, not {raw!r}") from error


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=model_dir, default="default", help=MODEL_HELP)
    parser.add_argument(
        "--memory-set",
        type=parse_override,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help=f"override an inference-time memory knob ({', '.join(OVERRIDABLE)}); repeatable",
    )
    parser.add_argument("--no-memory", action="store_true", help="sliding window only (ablation)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def load_eval_model(args: argparse.Namespace) -> MAGModel:
    """The model of `--model` with `--memory-set` applied, on `--device`."""
    import torch

    from memsvc.model import MAGModel
    from memsvc.model.io import load_model
    from memsvc.runtime import tune_allocator

    torch.set_num_threads(args.threads)
    tune_allocator()
    model = load_model(args.model, args.device)
    if not args.memory_set or model.config.memory is None:
        return model
    memory = replace(model.config.memory, **dict(args.memory_set))
    changed = MAGModel(replace(model.config, memory=memory)).to(args.device)
    changed.load_state_dict(model.state_dict())
    return changed.eval()
