"""The trainer end to end: a plain process, non-finite steps, the bias update."""

import math

import pytest
import torch

import moe_dist.train
from equivalence import global_batches, small_config, split, train_steps
from moe_dist.checkpoint import verify
from moe_dist.data.flags import IGNORE
from moe_dist.model import Transformer, moe_layers
from moe_dist.optim import build_optimizer, build_scheduler
from runs import SMALL_MODEL, checkpoint_weights, read_metrics, run_trainer, trainer_args, trainer_command

QUICK = ["--train.steps", "12", "--metrics.log_interval", "4", "--train.eval_interval", "6",
         "--train.eval_steps", "2", "--optim.warmup_steps", "2", "--optim.lr", "1e-2"]


@pytest.mark.slow
def test_plain_process_without_torchrun(tmp_path, prepared_data):
    result = run_trainer(trainer_command() + trainer_args(tmp_path, prepared_data, *QUICK, "--train.name", "solo"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 ranks = dp_shard 1 x ep 1" in result.stdout and "done: 12 steps" in result.stdout
    records = read_metrics(tmp_path / "solo")
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 4, 8, 12]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    assert {"aux_loss", "lr", "grad_norm", "tokens_per_s", "expert_load", "expert_load_max_mean"} <= train[0].keys()
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [6, 12] and evals[-1]["val_perplexity"] > 1


def test_bad_input_is_one_line_on_the_command_line(tmp_path):
    result = run_trainer(trainer_command() + ["--metrics.runs_dir", str(tmp_path), "--model.dim", "wide"])
    assert result.returncode == 2
    assert result.stderr == "config: model.dim must be int, got 'wide'\n" and not any(tmp_path.iterdir())


def poison_loss(monkeypatch, steps: set[int], poison):
    """Make the training loss return poison(loss) at these training steps (counting training calls only)."""
    real, calls = moe_dist.train.token_losses, []

    def token_losses(logits, targets):
        loss = real(logits, targets)
        if logits.requires_grad:
            calls.append(1)
            if len(calls) in steps:
                return poison(loss)
        return loss

    monkeypatch.setattr(moe_dist.train, "token_losses", token_losses)


def nan(loss):
    return loss * float("nan")


def test_nonfinite_steps_are_skipped(monkeypatch, capsys, tmp_path, prepared_data):
    poison_loss(monkeypatch, {3, 4}, nan)
    argv = trainer_args(tmp_path, prepared_data, *SMALL_MODEL, "--train.steps", "6", "--train.max_nonfinite_steps", "3")
    assert moe_dist.train.main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("non-finite loss nan") == 2 and "update skipped (2 in a row" in err
    train = {r["step"]: r for r in read_metrics(tmp_path / "tiny") if r["kind"] == "train"}
    assert [train[s]["skipped"] for s in range(1, 7)] == [False, False, True, True, False, False]
    assert train[3]["loss"] is None and train[6]["loss"] is not None  # NaN is written as null
    assert train[2]["lr"] == train[3]["lr"] == train[4]["lr"] < train[5]["lr"]  # the schedule waited
    weights = checkpoint_weights(tmp_path / "tiny" / "checkpoints" / "step-6")
    assert all(w.isfinite().all() for w in weights.values())


def test_nonfinite_steps_in_a_row_stop_the_run(monkeypatch, capsys, tmp_path, prepared_data):
    poison_loss(monkeypatch, set(range(5, 100)), nan)
    argv = trainer_args(tmp_path, prepared_data, *SMALL_MODEL, "--train.steps", "20", "--checkpoint.interval", "2",
                        "--train.max_nonfinite_steps", "3")
    assert moe_dist.train.main(argv) == 1
    checkpoints = tmp_path / "tiny" / "checkpoints"
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"train: 3 non-finite steps in a row (steps 5-7): stopped; the last good checkpoint is " \
                      f"{checkpoints / 'step-4'}"
    assert (checkpoints / "latest").read_text() == "step-4"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-2", "step-4"]
    verify(checkpoints / "step-4")


class InfiniteGradient(torch.autograd.Function):
    """The identity forward; an infinite gradient backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_nonfinite_gradient_skips_the_update(monkeypatch):
    poison_loss(monkeypatch, {1}, InfiniteGradient.apply)
    cfg = small_config()
    model = Transformer(cfg.model, cfg.moe)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    result = moe_dist.train.train_step(model, optimizer, scheduler, [split(global_batches(cfg, 1, 1)[0, 0])],
                                       cfg.optim.grad_clip)
    assert result.skipped and torch.tensor(result.loss).isfinite() and not torch.tensor(result.grad_norm).isfinite()
    assert not optimizer.state and scheduler.last_epoch == 0
    assert all(torch.equal(p, before[name]) and p.grad is None for name, p in model.named_parameters())


def test_a_batch_without_targets_makes_no_update():
    cfg = small_config()
    model = Transformer(cfg.model, cfg.moe)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    inputs, targets = split(global_batches(cfg, 1, 1)[0, 0])
    result = moe_dist.train.train_step(model, optimizer, scheduler, [(inputs, torch.full_like(targets, IGNORE))],
                                       cfg.optim.grad_clip)
    # No loss to claim, and no update from a gradient that would be the aux loss's alone.
    assert result.targets == 0 and math.isnan(result.loss) and not result.skipped
    assert not optimizer.state and scheduler.last_epoch == 0
    assert all(torch.equal(p, before[name]) and p.grad is None for name, p in model.named_parameters())


def test_a_run_without_targets_says_so(monkeypatch, capsys, tmp_path, prepared_data):
    real = moe_dist.train.to_device
    monkeypatch.setattr(moe_dist.train, "to_device", lambda batch, device: real(
        batch._replace(targets=torch.full_like(batch.targets, IGNORE)), device))  # train and validation batches
    argv = trainer_args(tmp_path, prepared_data, *SMALL_MODEL, "--train.steps", "3", "--metrics.log_interval", "10")
    assert moe_dist.train.main(argv) == 0
    err = capsys.readouterr().err
    for step in (1, 2, 3):
        assert f"warning: step {step}: the global batch has no target that counts" in err
    assert "warning: step 3: the validation batches (train.eval_steps = 1) have no target that counts" in err
    records = read_metrics(tmp_path / "tiny")
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]  # step 2 too: every such step is logged
    assert all(r["loss"] is None and r["targets"] == 0 and r["skipped"] for r in train)
    assert [(r["val_loss"], r["val_perplexity"]) for r in records if r["kind"] == "eval"] == [(None, None)]


def test_bias_updates_once_per_optimizer_step():
    rate = 0.01
    cfg = small_config(**{"moe.aux_free_bias": "true", "moe.bias_update_rate": str(rate),
                          "train.grad_accum": "4", "train.steps": "1"})
    torch.manual_seed(0)
    model = Transformer(cfg.model, cfg.moe)
    (result,) = train_steps(model, cfg, global_batches(cfg, 1, 1))
    for moe, counts in zip(moe_layers(model), result.expert_load):
        # One sign step from the counts of all four micro-batches together.
        expected = rate * torch.sign(counts.mean() - counts)
        torch.testing.assert_close(moe.router.expert_bias, expected)
    assert result.expert_load.sum(-1).eq(4 * 2 * cfg.data.seq_len * cfg.moe.top_k).all()
