"""`memsvc train`: train a MAG model on the recall curriculum, unattended.

    memsvc train --out runs/ref --config reference --time-budget 3600
    memsvc train --out runs/ref --resume --time-budget 3600      # continue the same run
    torchrun --nproc-per-node 8 -m memsvc.train.cli --out runs/big --config big.json

A run writes OUT/checkpoints/step-*/ (each a model directory plus trainer.pt)
every --checkpoint-every steps and when it stops, and the final model to
OUT/model. It stops at --max-steps (default: the curriculum's steps), at the
time budget, or on SIGINT / SIGTERM, always leaving a checkpoint that
--resume continues exactly. Options that change what is learned are fixed by
the checkpoint on --resume; --time-budget, --max-steps, --device and
--threads may change.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import structlog

from memsvc.commands import CommandParser
from memsvc.obs.logging import configure_logging
from memsvc.train.choices import CURRICULA, MEMORY_KINDS, PRESETS

if TYPE_CHECKING:
    from memsvc.train.recipe import TrainRecipe

# Recipe options: the checkpoint fixes them on --resume.
_RECIPE_OPTIONS = (
    "config",
    "memory",
    "curriculum",
    "init_from",
    "init_backbone_from",
    "memory_conv",
    "batch_size",
    "lr",
    "seed",
    "next_byte_weight",
    "key_loss_weight",
    "key_loss_kind",
    "phrasing",
    "advance_at",
    "checkpoint_every",
    "log_every",
)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="memsvc train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="run directory (checkpoints, final model)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run under --out from its latest checkpoint",
    )
    parser.add_argument(
        "--config", help=f"model preset {'/'.join(PRESETS)} or a ModelConfig JSON file (reference)"
    )
    parser.add_argument(
        "--memory",
        choices=MEMORY_KINDS,
        help="delta: matrix memory, exact delta rule (default); mlp: depth-2 MLP memory, one "
        "head, no momentum; deep2 / deep4: the Titans MLP memory, 4 heads, momentum",
    )
    parser.add_argument(
        "--curriculum",
        choices=CURRICULA,
        help="reference: from scratch (default); long: long-context fine-tuning after it",
    )
    parser.add_argument(
        "--init-from",
        help="start from this model directory's weights and config (fine-tuning); "
        "--config and --memory may not be given with it",
    )
    parser.add_argument(
        "--memory-conv",
        type=int,
        help="with --init-from: widen the memory's causal convolution to this many taps "
        "(new taps start at zero, so training starts from the same model) so its keys see "
        "further back",
    )
    parser.add_argument(
        "--init-backbone-from",
        help="start every parameter outside the memory from this model directory (the "
        "memory starts fresh): memories of any kind trained from one backbone",
    )
    parser.add_argument(
        "--time-budget", type=float, help="seconds for this invocation, setup included"
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        help="total steps of the run (default: the curriculum's); the cosine schedule spans "
        "them, so changing it on --resume reshapes the rest of the schedule",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help="warm-up sequences per step over all ranks; later stages keep its tokens per "
        "step (default: 8192 tokens per step)",
    )
    parser.add_argument("--lr", type=float, help="peak learning rate (2e-3)")
    parser.add_argument("--seed", type=int, help="model initialisation and data (0)")
    parser.add_argument(
        "--next-byte-weight", type=float, help="loss = answer loss + w * next-byte loss (0.3)"
    )
    parser.add_argument(
        "--key-loss-weight",
        type=float,
        help="+ w * the key-alignment loss of keyed facts: the memory query reading an answer "
        "drawn to its fact's write key (memsvc/train/key_loss.py; default 0: off)",
    )
    parser.add_argument(
        "--key-loss-kind",
        choices=("softmax", "linear", "both", "spread"),
        help="softmax: nearest among the batch's facts (default); linear: own key's cosine "
        "up, every earlier key's squared cosine down (what a delta-rule memory needs); both; "
        "spread: softmax + the facts' own write keys pushed near-orthogonal",
    )
    parser.add_argument(
        "--phrasing",
        choices=("train", "grammar", "grammar-value-first"),
        help="how the keyed facts of every stage are phrased: train: the training "
        "generator's fixed templates (default); grammar: half of the sentences composed "
        "from parts instead (memsvc/train/grammar.py), thousands of templates; "
        "grammar-value-first: the same with a third of the composed statements giving the "
        "value before the key",
    )
    parser.add_argument(
        "--advance-at",
        type=float,
        help="leave a stage early at this exact-match on its last batches (0.95; 0: never)",
    )
    parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (100)")
    parser.add_argument("--log-every", type=int, help="steps between log lines (10)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (auto)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (torch's default)")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (none unless on a terminal)"
    )
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error")
    parser.add_argument(
        "--log-json",
        action="store_true",
        default=None,
        help="JSON log lines (default: when stderr is not a terminal)",
    )
    return parser


def _new_recipe(args: argparse.Namespace, window: int) -> TrainRecipe:
    from memsvc.train.recipe import TrainRecipe, curriculum

    overrides = {
        "seed": args.seed,
        "init_from": args.init_from,
        "init_backbone_from": args.init_backbone_from,
        "lr": args.lr,
        "max_steps": args.max_steps,
        "next_byte_weight": args.next_byte_weight,
        "key_loss_weight": args.key_loss_weight,
        "key_loss_kind": args.key_loss_kind,
        "checkpoint_every": args.checkpoint_every,
        "log_every": args.log_every,
    }
    if args.advance_at is not None:
        overrides["advance_at"] = args.advance_at or None
    stages = curriculum(window, args.batch_size, args.curriculum or "reference")
    if args.phrasing is not None:
        stages = tuple(replace(stage, phrasing=args.phrasing) for stage in stages)
    return TrainRecipe(
        stages=stages,
        **{k: v for k, v in overrides.items() if v is not None},
    )


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_json)
    if args.resume:
        fixed = [
            f"--{k.replace('_', '-')}" for k in _RECIPE_OPTIONS if getattr(args, k) is not None
        ]
        if fixed:
            parser.error(f"{', '.join(fixed)}: fixed by the checkpoint when resuming")
    # Imported once the arguments are known to be good: `--help` needs none of this.
    import torch

    from memsvc.model.io import load_config
    from memsvc.train.distributed import Distributed
    from memsvc.train.progress import ProgressBar
    from memsvc.train.recipe import model_config
    from memsvc.train.trainer import Trainer, TrainingDivergedError

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    dist = Distributed.from_env(args.device)
    try:
        if args.resume:
            trainer = Trainer.resume(args.out, max_steps=args.max_steps, dist=dist)
        else:
            if args.init_from is not None and (args.config or args.memory):
                parser.error("--init-from takes the model's own config: drop --config/--memory")
            if args.memory_conv is not None and (args.init_from is None or args.memory_conv < 1):
                parser.error("--memory-conv takes a positive width and --init-from")
            if args.init_from is not None:
                config = load_config(args.init_from)
                if args.memory_conv is not None and config.memory is not None:
                    memory = replace(config.memory, conv_size=args.memory_conv)
                    config = replace(config, memory=memory)
            else:
                config = model_config(args.config or "reference", args.memory)
            trainer = Trainer.create(config, _new_recipe(args, config.window), args.out, dist=dist)
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        dist.close()
        print(f"memsvc train: {error}", file=sys.stderr)
        return 2

    def stop(signum: int, frame: object) -> None:
        trainer.request_stop()
        signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    budget = None
    if args.time_budget is not None:
        budget = args.time_budget - (time.perf_counter() - started)
    show_bar = dist.is_main and not args.no_progress and sys.stderr.isatty()
    bar = ProgressBar(trainer.recipe.total_steps, trainer.state.step) if show_bar else None
    try:
        with bar or contextlib.nullcontext():
            trainer.run(time_budget=budget, progress=bar)
    except TrainingDivergedError as error:
        structlog.get_logger(__name__).error("train_diverged", error=str(error))
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        dist.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
