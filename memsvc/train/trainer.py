"""`Trainer`: the training loop of a MAG model on the synthetic recall curriculum.

One step: the stage's batch for (seed, rollbacks, step, rank) -> forward from a
fresh state -> loss = answer loss + w * next-byte loss -> backward -> gradient
clipping -> the all-reduced numbers decide: update, or skip the step. Batches
are a pure function of the step, so a resumed run sees the batches the
uninterrupted run would have seen; with the weights, the optimizer, the
`TrainState` and the RNG states restored from a checkpoint it continues
bit for bit.

Guarding (docs/TRAINING.md: skipping NaN steps alone loses the run once
the weights reach a state that blows up every batch): a step whose loss or
gradient is not finite, or whose loss jumps far above its recent average, is
skipped; `max_bad_steps` in a row roll the run back to the last checkpoint and
lower the learning rate. After a rollback the replayed steps draw fresh batches
(the rollback count is part of the batch seed).
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import structlog
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from memsvc.memory import NeuralMemory
from memsvc.model import MAGModel, ModelConfig, save_model
from memsvc.model.io import load_model
from memsvc.train.checkpoints import (
    Checkpoint,
    RunCheckpoints,
    checkpoint_position,
    read_checkpoint,
)
from memsvc.train.distributed import Distributed
from memsvc.train.key_loss import keep_queries, with_key_loss
from memsvc.train.progress import ProgressBar
from memsvc.train.recipe import TrainRecipe, learning_rate_multiplier, parameter_groups
from memsvc.train.tasks import Batch

log = structlog.get_logger(__name__)

CHECKPOINT_FORMAT = 1
LossHook = Callable[[int, Tensor], Tensor]  # (step, loss) -> loss; tests inject faults here


class TrainingDivergedError(RuntimeError):
    """The run kept going bad after `max_rollbacks` rollbacks."""


def batch_seed(seed: int, rollbacks: int, step: int, rank: int) -> int:
    """The seed of a rank's batch at a step: unrelated seeds for neighbouring steps and ranks."""
    key = f"{seed}:{rollbacks}:{step}:{rank}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


@dataclass
class TrainState:
    """What a resume needs besides the weights, the optimizer and the RNG states."""

    step: int = 0  # steps taken: updates and skipped steps
    stage: int = 0  # index into the recipe's stages
    stage_start: int = 0  # the step the current stage began at
    lr_scale: float = 1.0  # lowered by each rollback
    rollbacks: int = 0
    skipped: int = 0  # over the whole run, across rollbacks
    bad_streak: int = 0  # skipped steps in a row
    loss_ema: float = 0.0  # of the good steps' losses in this stage
    good_in_stage: int = 0  # good steps in this stage (the EMA's age)
    recent_exact: list[float] = field(default_factory=list)  # exact-match of the last batches
    tokens: int = 0  # tokens trained on, all ranks


@dataclass(frozen=True)
class StepMetrics:
    """One step, averaged over the ranks."""

    step: int  # the step's index (TrainState.step before it)
    stage: str
    loss: float
    answer_loss: float
    next_byte_loss: float
    exact_match: float  # share of samples whose every answer byte is the argmax
    grad_norm: float  # before clipping
    lr: float
    tokens: int
    skipped: str | None  # why the step was skipped: "non_finite", "exploded"; None: applied


@dataclass(frozen=True)
class RunSummary:
    steps: int  # TrainState.step at the end
    reason: str  # "max_steps", "time_budget" or "stop_requested"
    seconds: float
    tokens_per_s: float
    skipped: int
    rollbacks: int
    checkpoint: Path
    history: list[StepMetrics]  # this run's steps, in order (rolled-back ones included)


@dataclass(frozen=True)
class BatchLosses:
    answer: Tensor  # mean cross-entropy over answer bytes
    next_byte: Tensor  # mean cross-entropy over every real target
    correct: Tensor  # samples answered exactly
    answered: Tensor  # samples with an answer


def batch_losses(logits: Tensor, batch: Batch) -> BatchLosses:
    """logits: (B, T, vocab) for batch.inputs."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), batch.targets, reduction="none")  # (B, T)
    answer, text = batch.answer_mask, batch.text_mask
    hit = (logits.argmax(-1) == batch.targets) | ~answer  # (B, T)
    has_answer = answer.any(dim=1)  # (B,)
    return BatchLosses(
        answer=(ce * answer).sum() / answer.sum().clamp_min(1),
        next_byte=(ce * text).sum() / text.sum().clamp_min(1),
        correct=(hit.all(dim=1) & has_answer).sum(),
        answered=has_answer.sum(),
    )


def load_backbone(model: MAGModel, source: MAGModel, name: str) -> None:
    """Copy every parameter of `source` outside the memory modules into `model`."""
    theirs = source.state_dict()
    for key, value in model.state_dict().items():
        if ".memory." in key:
            continue
        if key not in theirs or theirs[key].shape != value.shape:
            raise ValueError(f"{name}: its backbone differs from the run's at {key}")
        value.copy_(theirs[key])


def load_widened(model: MAGModel, source: MAGModel, name: str) -> None:
    """Copy `source` into `model`, whose config may differ only in a wider memory
    convolution: the new, older taps start at zero, so `model` computes what `source`
    did and fine-tuning starts from the same function with keys that can see further."""
    theirs_cfg, ours_cfg = source.config.memory, model.config.memory
    if (
        theirs_cfg is None
        or ours_cfg is None
        or source.config
        != replace(model.config, memory=replace(ours_cfg, conv_size=theirs_cfg.conv_size))
    ):
        raise ValueError(f"{name}: its config differs from the run's")
    if ours_cfg.conv_size < theirs_cfg.conv_size:
        raise ValueError(
            f"{name}: memory conv_size {theirs_cfg.conv_size} cannot narrow to {ours_cfg.conv_size}"
        )
    theirs = source.state_dict()
    for key, value in model.state_dict().items():
        given = theirs[key]
        if key.endswith("memory.conv_weight"):  # (channels, 1, taps), the current tap last
            value.zero_()
            value[..., value.shape[-1] - given.shape[-1] :] = given
        else:
            value.copy_(given)


class Trainer:
    """Trains `model` by `recipe`, writing checkpoints under `out`.

    Build one with `Trainer.create` (a new run) or `Trainer.resume` (the latest
    checkpoint under `out`); then `run()`, or `step()` one step at a time.
    """

    def __init__(
        self,
        model: MAGModel,
        recipe: TrainRecipe,
        out: str | os.PathLike[str],
        *,
        dist: Distributed | None = None,
        loss_hook: LossHook | None = None,
    ) -> None:
        self.dist = dist or Distributed(rank=0, world_size=1, device=torch.device("cpu"))
        self.recipe = recipe
        self.out = Path(out)
        self.checkpoints = RunCheckpoints(out)
        self.loss_hook = loss_hook
        self.model = model.to(self.dist.device)
        for module in self.model.modules():
            # A non-finite memory shows up in the loss, which every rank sees; raising
            # inside one rank's forward would leave the others waiting in the all-reduce.
            if isinstance(module, NeuralMemory):
                module.check_finite = False
        self.net: torch.nn.Module = self.model
        if self.dist.active:
            ids = [self.dist.device] if self.dist.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model, recipe),
            lr=recipe.lr,
            betas=recipe.betas,
            fused=self.dist.device.type == "cuda",
        )
        # Each rank draws its own share of a stage's sequences per step.
        self.stages = tuple(
            replace(s, batch_size=max(1, s.batch_size // self.dist.world_size))
            for s in recipe.stages
        )
        self.state = TrainState()
        self._stop_requested = False
        self.memories = keep_queries(self.model) if recipe.key_loss_weight > 0 else []

    # ---- building ----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        config: ModelConfig,
        recipe: TrainRecipe,
        out: str | os.PathLike[str],
        *,
        dist: Distributed | None = None,
        loss_hook: LossHook | None = None,
    ) -> Trainer:
        """A new run: the model initialised from `recipe.seed`, or with the weights of the
        model directory `recipe.init_from` (whose config must be `config`, or it with a
        wider memory convolution: `load_widened`). `out` must
        hold no run."""
        existing = RunCheckpoints(out).latest()
        if existing is not None:
            raise FileExistsError(f"{out} already holds a run ({existing.name}): resume it")
        if dist is not None:
            dist.barrier()  # every rank has looked before rank 0 writes the first checkpoint
        random.seed(recipe.seed)
        torch.manual_seed(recipe.seed)
        model = MAGModel(config)
        if recipe.init_from is not None:
            start = load_model(recipe.init_from)
            if start.config == config:
                model.load_state_dict(start.state_dict())
            else:
                load_widened(model, start, recipe.init_from)
        if recipe.init_backbone_from is not None:
            load_backbone(model, load_model(recipe.init_backbone_from), recipe.init_backbone_from)
        return cls(model, recipe, out, dist=dist, loss_hook=loss_hook)

    @classmethod
    def resume(
        cls,
        out: str | os.PathLike[str],
        *,
        max_steps: int | None = None,
        dist: Distributed | None = None,
        loss_hook: LossHook | None = None,
    ) -> Trainer:
        """The run under `out`, from its latest checkpoint; `max_steps` may extend it."""
        path = RunCheckpoints(out).latest()
        if path is None:
            raise FileNotFoundError(f"no checkpoint to resume under {out}")
        checkpoint = read_checkpoint(path)
        recipe = TrainRecipe.from_dict(checkpoint.trainer["recipe"])
        if max_steps is not None:
            recipe = replace(recipe, max_steps=max_steps)
        trainer = cls(
            MAGModel(checkpoint.model_config), recipe, out, dist=dist, loss_hook=loss_hook
        )
        trainer._restore(checkpoint)
        if checkpoint.trainer["world_size"] != trainer.dist.world_size and trainer.dist.is_main:
            log.warning(
                "world_size_changed",
                checkpoint=checkpoint.trainer["world_size"],
                now=trainer.dist.world_size,
                note="each rank's share of a batch changes: the run goes on, not bit for bit",
            )
        return trainer

    # ---- one step ----------------------------------------------------------------------

    def step(self) -> StepMetrics:
        """Take one step: an update, or a skip when the numbers are bad."""
        st, recipe, device = self.state, self.recipe, self.dist.device
        stage = self.stages[st.stage]
        seed = batch_seed(recipe.seed, st.rollbacks, st.step, self.dist.rank)
        batch = stage.batch(self.model.config.window, seed)
        batch = Batch(**{f.name: getattr(batch, f.name).to(device) for f in fields(batch)})
        lr = self._apply_learning_rate()

        logits, _ = self.net(batch.inputs)
        losses = batch_losses(logits, batch)
        loss = losses.answer + recipe.next_byte_weight * losses.next_byte
        if self.memories:
            loss = with_key_loss(loss, self.memories, batch, recipe)
        if self.loss_hook is not None:
            loss = self.loss_hook(st.step, loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), recipe.grad_clip)

        # One all-reduce and one device sync per step.
        totals = torch.stack([
            loss.detach(), losses.answer.detach(), losses.next_byte.detach(),
            losses.correct, losses.answered, grad_norm,
        ]).double()  # fmt: skip
        world = self.dist.world_size
        total_loss, answer, next_byte, correct, answered, norm = self.dist.sum(totals).tolist()
        total_loss, answer, next_byte, norm = (
            v / world for v in (total_loss, answer, next_byte, norm)
        )
        exact = correct / answered if answered else 0.0

        skipped = self._judge(total_loss, norm)
        if skipped is None:
            self.optimizer.step()
            st.bad_streak = 0
            st.loss_ema = (
                total_loss if st.good_in_stage == 0 else 0.9 * st.loss_ema + 0.1 * total_loss
            )
            st.good_in_stage += 1
            st.recent_exact = [*st.recent_exact, exact][-recipe.advance_window :]
        else:
            st.skipped += 1
            st.bad_streak += 1
        self.optimizer.zero_grad(set_to_none=True)
        tokens = batch.inputs.numel() * world
        st.tokens += tokens
        metrics = StepMetrics(
            step=st.step,
            stage=stage.name,
            loss=total_loss,
            answer_loss=answer,
            next_byte_loss=next_byte,
            exact_match=exact,
            grad_norm=norm,
            lr=lr,
            tokens=tokens,
            skipped=skipped,
        )
        st.step += 1
        self._advance_stage()
        return metrics

    def _apply_learning_rate(self) -> float:
        lr = self.recipe.lr * learning_rate_multiplier(self.recipe, self.state.step)
        lr *= self.state.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        return lr

    def _judge(self, loss: float, grad_norm: float) -> str | None:
        """Why this step must be skipped, or None."""
        st, recipe = self.state, self.recipe
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return "non_finite"
        warm = st.good_in_stage >= recipe.explode_warmup
        limit = recipe.explode_factor * st.loss_ema + recipe.explode_slack
        limit = max(limit, recipe.explode_floor)
        if warm and loss > limit:
            return "exploded"
        return None

    def _advance_stage(self) -> None:
        """Next stage after the stage's steps, or once its recent batches are answered
        well enough. The last stage runs until the end."""
        st, recipe = self.state, self.recipe
        if st.stage + 1 >= len(self.stages):
            return
        recent = st.recent_exact
        reached = (
            recipe.advance_at is not None
            and len(recent) >= recipe.advance_window
            and sum(recent) / len(recent) >= recipe.advance_at
        )
        if st.step - st.stage_start < self.stages[st.stage].steps and not reached:
            return
        if self.dist.is_main:
            log.info(
                "stage_advanced",
                step=st.step,
                finished=self.stages[st.stage].name,
                stage=self.stages[st.stage + 1].name,
                by="exact_match" if reached else "steps",
            )
        st.stage += 1
        st.stage_start = st.step
        st.recent_exact = []
        st.loss_ema, st.good_in_stage = 0.0, 0  # a new stage's losses have a new level

    # ---- the loop ----------------------------------------------------------------------

    def request_stop(self) -> None:
        """Finish the current step, write a checkpoint and return (signal handlers)."""
        self._stop_requested = True

    def run(
        self, time_budget: float | None = None, progress: ProgressBar | None = None
    ) -> RunSummary:
        """Train until the recipe's total steps, the time budget (seconds, this call) or a
        stop request; then write a checkpoint and the model to OUT/model.

        progress: a live bar to update after each step (the CLI's, on a terminal).
        """
        started = time.perf_counter()
        st, recipe = self.state, self.recipe
        total = recipe.total_steps
        if self.dist.is_main:
            self.checkpoints.remove_temporaries()
        checkpoint_seconds = 0.0
        if self.checkpoints.latest() is None:  # a rollback target before the first interval
            checkpoint_seconds = self._timed_checkpoint()
        if self.dist.is_main:
            log.info(
                "train_start",
                step=st.step,
                total_steps=total,
                stage=self.stages[st.stage].name,
                parameters=self.model.num_params(),
                device=str(self.dist.device),
                world_size=self.dist.world_size,
                time_budget=time_budget,
            )
        history: list[StepMetrics] = []
        run_tokens, step_seconds, reason = 0, 0.0, "max_steps"
        interval: list[StepMetrics] = []
        interval_start = time.perf_counter()
        while self.state.step < total:
            elapsed = time.perf_counter() - started
            over_budget = (
                time_budget is not None
                and elapsed + step_seconds + checkpoint_seconds > time_budget
            )
            if self.dist.any(over_budget or self._stop_requested):
                reason = "time_budget" if over_budget else "stop_requested"
                break
            step_started = time.perf_counter()
            metrics = self.step()
            step_seconds = time.perf_counter() - step_started
            history.append(metrics)
            interval.append(metrics)
            run_tokens += metrics.tokens
            if metrics.skipped is not None and self.dist.is_main:
                log.warning(
                    "step_skipped",
                    step=metrics.step,
                    reason=metrics.skipped,
                    loss=metrics.loss,
                    grad_norm=metrics.grad_norm,
                    streak=self.state.bad_streak,
                )
            if self.state.bad_streak >= recipe.max_bad_steps:
                self.rollback()
                continue
            step, now = self.state.step, time.perf_counter()
            tokens_per_s = sum(m.tokens for m in interval) / max(now - interval_start, 1e-9)
            if progress is not None:
                progress.update(step, metrics.stage, metrics.loss, tokens_per_s)
            if step % recipe.log_every == 0 or step == total:
                self._log_interval(interval, tokens_per_s)
                interval, interval_start = [], now
            if step % recipe.checkpoint_every == 0:
                checkpoint_seconds = self._timed_checkpoint()
        path = self.checkpoints.latest()
        if path is None or checkpoint_position(path) != (self.state.step, self.state.rollbacks):
            self._timed_checkpoint()
            path = self.checkpoints.latest()
        if self.dist.is_main:
            save_model(self.model, self.out / "model")
        seconds = time.perf_counter() - started
        summary = RunSummary(
            steps=self.state.step,
            reason=reason,
            seconds=seconds,
            tokens_per_s=run_tokens / max(seconds, 1e-9),
            skipped=self.state.skipped,
            rollbacks=self.state.rollbacks,
            checkpoint=path,
            history=history,
        )
        if self.dist.is_main:
            log.info(
                "train_stopped",
                reason=reason,
                step=summary.steps,
                seconds=round(seconds, 2),
                tokens_per_s=round(summary.tokens_per_s),
                skipped=summary.skipped,
                rollbacks=summary.rollbacks,
                checkpoint=str(path),
            )
        return summary

    def _log_interval(self, interval: list[StepMetrics], tokens_per_s: float) -> None:
        good = [m for m in interval if m.skipped is None]
        if not self.dist.is_main or not good:
            return

        def mean(name: str) -> float:
            return round(sum(getattr(m, name) for m in good) / len(good), 5)

        log.info(
            "train_step",
            step=self.state.step,
            stage=interval[-1].stage,
            loss=mean("loss"),
            answer_loss=mean("answer_loss"),
            next_byte_loss=mean("next_byte_loss"),
            exact_match=mean("exact_match"),
            grad_norm=mean("grad_norm"),
            tokens_per_s=round(tokens_per_s),
            lr=float(f"{interval[-1].lr:.4g}"),
            skipped=len(interval) - len(good),
        )

    # ---- checkpoints and rollback ------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint (rank 0; every rank waits for it). Returns its path."""
        path = None
        if self.dist.is_main:
            path = self.checkpoints.save(
                self.model,
                self._trainer_dict(),
                self.state.step,
                self.state.rollbacks,
                self.recipe.keep_checkpoints,
            )
            log.info("checkpoint_saved", step=self.state.step, path=str(path))
        self.dist.barrier()
        return path

    def _timed_checkpoint(self) -> float:
        started = time.perf_counter()
        self.save_checkpoint()
        return time.perf_counter() - started

    def rollback(self) -> None:
        """Back to the latest checkpoint with the learning rate lowered."""
        st, recipe = self.state, self.recipe
        if st.rollbacks >= recipe.max_rollbacks:
            raise TrainingDivergedError(
                f"{st.bad_streak} bad steps in a row at step {st.step} after "
                f"{st.rollbacks} rollbacks"
            )
        path = self.checkpoints.latest()
        assert path is not None, "run() writes a checkpoint before the first step"
        lr_scale, rollbacks, skipped, from_step = (
            st.lr_scale * recipe.rollback_lr_factor,
            st.rollbacks + 1,
            st.skipped,
            st.step,
        )
        self._restore(read_checkpoint(path))
        self.state.lr_scale, self.state.rollbacks, self.state.skipped = lr_scale, rollbacks, skipped
        self.state.bad_streak = 0
        if self.dist.is_main:
            log.warning(
                "rolled_back",
                from_step=from_step,
                to_step=self.state.step,
                checkpoint=path.name,
                lr_scale=lr_scale,
                rollbacks=rollbacks,
            )

    def _trainer_dict(self) -> dict[str, Any]:
        cuda = self.dist.device.type == "cuda"
        return {
            "format": CHECKPOINT_FORMAT,
            "recipe": self.recipe.to_dict(),
            "state": asdict(self.state),
            "optimizer": self.optimizer.state_dict(),
            "rng": {
                "python": random.getstate(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if cuda else [],
            },
            "world_size": self.dist.world_size,
        }

    def _restore(self, checkpoint: Checkpoint) -> None:
        trainer = checkpoint.trainer
        if trainer.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{checkpoint.path}: unknown trainer format {trainer.get('format')}")
        if checkpoint.model_config != self.model.config:
            raise ValueError(f"{checkpoint.path} holds a different model configuration")
        self.model.load_state_dict(checkpoint.weights, strict=True)
        self.optimizer.load_state_dict(trainer["optimizer"])
        self.state = TrainState(**trainer["state"])
        rng = trainer["rng"]
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and self.dist.device.type == "cuda":
            torch.cuda.set_rng_state_all(rng["cuda"])
