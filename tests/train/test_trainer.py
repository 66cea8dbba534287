"""The trainer on the tiny preset: it learns, resumes bit for bit, stops within its time
budget leaving a resumable checkpoint, skips and rolls back bad steps without poisoning
the weights, and keeps DDP ranks in step (2 gloo processes on the CPU)."""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import Tensor

from memsvc.model import MAGModel, ModelConfig, load_model, model_hash, save_model
from memsvc.train.checkpoints import RunCheckpoints, checkpoint_position
from memsvc.train.cli import main
from memsvc.train.distributed import Distributed
from memsvc.train.recipe import TrainRecipe, learning_rate_multiplier, model_config
from memsvc.train.tasks import Stage
from memsvc.train.trainer import Trainer, TrainingDivergedError

TINY = model_config("tiny")
WARMUP = Stage("warmup-in-window", length=160, needle="in_window", steps=1000, batch_size=4)


def recipe(**overrides) -> TrainRecipe:
    base = {
        "stages": (WARMUP,),
        "warmup_steps": 2,
        "max_steps": 10,
        "log_every": 1000,
        "checkpoint_every": 1000,
    }
    return TrainRecipe(**{**base, **overrides})


def weights(model: MAGModel) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_finite(model: MAGModel) -> None:
    for name, value in model.state_dict().items():
        assert torch.isfinite(value).all(), name


def test_loss_goes_down_on_the_in_window_warmup(tmp_path: Path) -> None:
    trainer = Trainer.create(TINY, recipe(max_steps=20, lr=5e-3), tmp_path)
    summary = trainer.run()
    losses = [m.loss for m in summary.history]
    answers = [m.answer_loss for m in summary.history]
    assert summary.steps == 20 and summary.reason == "max_steps" and summary.skipped == 0
    assert sum(losses[-5:]) / 5 < sum(losses[:3]) / 3 - 1.0, losses
    assert sum(answers[-5:]) / 5 < sum(answers[:3]) / 3 - 1.0, answers
    assert summary.tokens_per_s > 0
    # The final model is a loadable model directory equal to the trained one.
    assert model_hash(tmp_path / "model") == model_hash(trainer.model)


def test_resume_reproduces_a_straight_run_exactly(tmp_path: Path) -> None:
    r = recipe(max_steps=6, checkpoint_every=100)
    straight = Trainer.create(TINY, r, tmp_path / "straight")
    straight.run()

    interrupted = Trainer.create(TINY, r, tmp_path / "resumed")
    for _ in range(3):
        interrupted.step()
    interrupted.save_checkpoint()
    del interrupted
    resumed = Trainer.resume(tmp_path / "resumed")
    assert resumed.state.step == 3
    resumed.run()

    assert resumed.state == straight.state
    a, b = weights(straight.model), weights(resumed.model)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    opt_a, opt_b = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    for index, state in opt_a["state"].items():
        assert torch.equal(state["exp_avg_sq"], opt_b["state"][index]["exp_avg_sq"])


def test_time_budget_stops_the_run_and_leaves_a_resumable_checkpoint(tmp_path: Path) -> None:
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # its first use imports dynamo (~2 s)
    out = str(tmp_path / "run")
    common = ["--out", out, "--no-progress"]
    started = time.perf_counter()
    code = main([*common, "--config", "tiny", "--batch-size", "4", "--time-budget", "2.0"])
    elapsed = time.perf_counter() - started
    assert code == 0
    assert elapsed < 3.0, elapsed  # the budget, plus at most about one step and a checkpoint

    latest = RunCheckpoints(out).latest()
    step, rollbacks = checkpoint_position(latest)
    assert 0 < step < TrainRecipe(stages=(WARMUP,)).total_steps and rollbacks == 0
    load_model(latest)  # a checkpoint is a model directory
    assert model_hash(Path(out) / "model") == model_hash(latest)

    assert main([*common, "--config", "tiny"]) == 2  # a run is there: resume it, never clobber
    with pytest.raises(SystemExit):
        main([*common, "--resume", "--lr", "1.0"])  # the recipe is the checkpoint's
    assert main([*common, "--resume", "--max-steps", str(step + 2)]) == 0
    resumed = Trainer.resume(out)
    assert resumed.state.step == step + 2 and resumed.recipe.max_steps == step + 2
    assert resumed.recipe.lr == 2e-3 and resumed.recipe.stages[0].batch_size == 4


def test_fine_tuning_starts_from_a_model_directory(tmp_path: Path) -> None:
    source = MAGModel(TINY)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))  # unlike any seed's initialisation
    save_model(source, tmp_path / "start")
    tuned = Trainer.create(TINY, recipe(init_from=str(tmp_path / "start")), tmp_path / "second")
    assert model_hash(tuned.model) == model_hash(tmp_path / "start")
    other = model_config("tiny", "mlp")
    with pytest.raises(ValueError, match="config differs"):
        Trainer.create(other, recipe(init_from=str(tmp_path / "start")), tmp_path / "third")

    out = str(tmp_path / "cli")
    base = ["--out", out, "--no-progress", "--init-from", str(tmp_path / "start")]
    with pytest.raises(SystemExit):
        main([*base, "--config", "tiny"])  # the model directory brings its own config
    assert main([*base, "--curriculum", "long", "--time-budget", "0"]) == 0  # setup only
    run = Trainer.resume(out)
    assert run.recipe.init_from == str(tmp_path / "start") and run.state.step == 0
    assert run.recipe.stages[0].name == "long-8k"
    assert model_hash(run.model) == model_hash(tmp_path / "start")


def test_a_widened_memory_convolution_starts_from_the_same_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = MAGModel(TINY)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_model(source, tmp_path / "start")
    out = str(tmp_path / "wide")
    base = ["--out", out, "--no-progress", "--init-from", str(tmp_path / "start")]
    assert main([*base, "--memory-conv", "9", "--time-budget", "0"]) == 0
    wide = Trainer.resume(out).model
    assert wide.config.memory is not None and wide.config.memory.conv_size == 9
    tokens = torch.randint(0, 256, (2, 300))
    with torch.no_grad():
        expected, _ = source(tokens, source.init_state(2))
        got, _ = wide(tokens, wide.init_state(2))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    narrow = str(tmp_path / "narrow")
    wide_dir = str(tmp_path / "wide-model")
    save_model(wide, wide_dir)
    assert main(["--out", narrow, "--init-from", wide_dir, "--memory-conv", "2"]) == 2
    assert "conv_size 9 cannot narrow to 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", narrow, "--memory-conv", "9"])  # nothing to widen


@pytest.mark.parametrize(("fault", "reason"), [(math.nan, "non_finite"), (1e4, "exploded")])
def test_a_bad_step_is_skipped_without_touching_the_weights(
    tmp_path: Path, fault: float, reason: str
) -> None:
    bad_step = 6

    def hook(step: int, loss: Tensor) -> Tensor:
        return loss * fault if step == bad_step else loss

    trainer = Trainer.create(TINY, recipe(explode_warmup=3), tmp_path, loss_hook=hook)
    for _ in range(bad_step):
        assert trainer.step().skipped is None
    before = weights(trainer.model)
    optimizer_before = trainer.optimizer.state_dict()["state"][0]["exp_avg"].clone()

    metrics = trainer.step()
    assert metrics.skipped == reason and trainer.state.skipped == 1
    after = weights(trainer.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(trainer.optimizer.state_dict()["state"][0]["exp_avg"], optimizer_before)

    for _ in range(3):
        assert trainer.step().skipped is None
    assert trainer.state.step == bad_step + 4 and trainer.state.bad_streak == 0
    assert_finite(trainer.model)
    assert not torch.equal(trainer.model.lm_head.weight, before["lm_head.weight"])


def test_a_hard_batch_under_the_floor_is_not_an_explosion(tmp_path: Path) -> None:
    """Loss well above 3 x EMA + 1 but under ln(vocab): one hard batch, trained on."""
    hard_step = 6

    def hook(step: int, loss: Tensor) -> Tensor:
        return loss * 0 + 5.0 if step == hard_step else loss * 0.1  # EMA ~0.1 x the loss

    r = recipe(explode_warmup=3, explode_factor=1.1, explode_slack=0.0)
    trainer = Trainer.create(TINY, r, tmp_path, loss_hook=hook)
    for _ in range(hard_step):
        assert trainer.step().skipped is None
    assert 1.1 * trainer.state.loss_ema < 5.0 < math.log(260)
    assert trainer.step().skipped is None and trainer.state.skipped == 0


def test_repeated_bad_steps_roll_back_and_lower_the_learning_rate(tmp_path: Path) -> None:
    poisoned = {5, 6, 7}  # NaN once each; the replay after the rollback is clean

    def hook(step: int, loss: Tensor) -> Tensor:
        if step in poisoned:
            poisoned.remove(step)
            return loss * math.nan
        return loss

    r = recipe(max_steps=10, checkpoint_every=4, max_bad_steps=3)
    trainer = Trainer.create(TINY, r, tmp_path, loss_hook=hook)
    summary = trainer.run()

    steps = [m.step for m in summary.history]
    assert steps == [0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7, 8, 9]
    assert [m.skipped for m in summary.history[5:8]] == ["non_finite"] * 3
    assert summary.rollbacks == 1 and summary.skipped == 3 and summary.steps == 10
    assert trainer.state.lr_scale == 0.5
    first, replay = summary.history[4], summary.history[8]
    assert replay.lr == pytest.approx(0.5 * first.lr)
    assert first.lr == pytest.approx(r.lr * learning_rate_multiplier(r, 4))
    # The same weights (the step-4 checkpoint) on a fresh batch: the replay is not a rerun.
    assert replay.loss != first.loss
    assert_finite(trainer.model)
    assert checkpoint_position(summary.checkpoint) == (10, 1)

    def always_nan(step: int, loss: Tensor) -> Tensor:
        return loss * math.nan

    doomed = Trainer.create(
        TINY, recipe(max_rollbacks=1, max_bad_steps=2), tmp_path / "doomed", loss_hook=always_nan
    )
    initial = model_hash(doomed.model)
    with pytest.raises(TrainingDivergedError):
        doomed.run()
    assert doomed.state.rollbacks == 1 and doomed.state.skipped == 4
    assert model_hash(doomed.model) == initial  # no bad step ever reached the weights


def test_stages_advance_by_steps_or_by_exact_match(tmp_path: Path) -> None:
    short = Stage("warmup-in-window", length=160, needle="in_window", steps=2, batch_size=4)
    beyond = Stage("beyond-window", length=200, needle="out_of_window", steps=50, batch_size=2)
    third = Stage("third", length=160, needle="any", steps=50, batch_size=2)
    r = recipe(stages=(short, beyond, third), advance_at=0.8, advance_window=10)
    trainer = Trainer.create(TINY, r, tmp_path)
    assert [trainer.step().stage for _ in range(3)] == [short.name, short.name, beyond.name]
    assert trainer.state.stage == 1 and trainer.state.stage_start == 2

    # Nine exact batches and this step's (not exact: an untrained model) average 0.9 >= 0.8.
    trainer.state.recent_exact = [1.0] * 9
    assert trainer.step().exact_match == 0.0
    assert trainer.state.stage == 2 and trainer.state.stage_start == 4
    assert trainer.state.recent_exact == [] and trainer.state.good_in_stage == 0


def test_config_presets_and_files(tmp_path: Path) -> None:
    assert model_config("reference") == ModelConfig()  # the reference model is the defaults
    mlp = model_config("reference", "mlp").memory
    assert (mlp.depth, mlp.update_rule, mlp.lookahead) == (2, "chunk", True)
    path = tmp_path / "model.json"
    path.write_text(json.dumps(TINY.to_dict()))
    assert model_config(str(path)) == TINY
    assert model_config(str(path), "mlp").memory == model_config("tiny", "mlp").memory
    with pytest.raises(ValueError, match="neither a preset"):
        model_config("huge")


@pytest.mark.parametrize("memory", ["delta", "mlp"])
def test_every_parameter_gets_a_gradient(tmp_path: Path, memory: str) -> None:
    """DDP (without find_unused_parameters) needs a gradient for every parameter."""
    trainer = Trainer.create(model_config("tiny", memory), recipe(), tmp_path)
    seen: set[str] = set()
    for name, param in trainer.model.named_parameters():
        param.register_post_accumulate_grad_hook(lambda p, name=name: seen.add(name))
    assert trainer.step().skipped is None
    assert seen == {name for name, _ in trainer.model.named_parameters()}
    assert_finite(trainer.model)


def _ddp_worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(
        {
            "WORLD_SIZE": str(world_size),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    dist = Distributed.from_env("cpu")
    try:
        trainer = Trainer.create(TINY, recipe(max_steps=2), out, dist=dist)
        summary = trainer.run()
        tokens = summary.history[0].tokens
        Path(out, f"rank{rank}.txt").write_text(f"{model_hash(trainer.model)} {tokens}")
    finally:
        dist.close()


def test_two_gloo_ranks_stay_in_step(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = str(tmp_path / "ddp")
    mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)

    hashes = [Path(out, f"rank{r}.txt").read_text().split() for r in range(2)]
    assert hashes[0] == hashes[1]  # same weights on both ranks after 2 updates
    assert int(hashes[0][1]) == 2 * (WARMUP.batch_size // 2) * (WARMUP.length - 1)
    latest = RunCheckpoints(out).latest()
    assert checkpoint_position(latest) == (2, 0)
    assert model_hash(latest) == hashes[0][0]
