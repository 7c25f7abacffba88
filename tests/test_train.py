"""The trainer end to end: torchrun, a plain process, bad input, the bias update."""

import json
from pathlib import Path

import pytest
import torch

from equivalence import global_batches, small_config, train_steps
from moe_dist.model import Transformer, moe_layers
from runs import run_trainer, trainer_args, trainer_command

QUICK = ["--train.steps", "12", "--metrics.log_interval", "4", "--train.eval_interval", "6",
         "--train.eval_steps", "2", "--optim.warmup_steps", "2", "--optim.lr", "1e-2"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_torchrun_two_ranks_on_the_default_corpus(tmp_path):
    result = run_trainer(trainer_command(2) + ["--metrics.runs_dir", str(tmp_path), *QUICK])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: 12 steps" in result.stdout and "dp_shard 1 x ep 2" in result.stdout
    records = read_metrics(tmp_path / "tiny")
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 4, 8, 12]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    assert {"aux_loss", "lr", "grad_norm", "tokens_per_s", "expert_load_max_mean"} <= train[0].keys()
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [6, 12] and evals[-1]["val_perplexity"] > 1
    assert (tmp_path / "tiny" / "config.toml").read_text().count("ep = 2") == 1


@pytest.mark.slow
def test_plain_process_without_torchrun(tmp_path, prepared_data):
    result = run_trainer(trainer_command() + trainer_args(tmp_path, prepared_data, *QUICK, "--train.name", "solo"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 ranks = dp_shard 1 x ep 1" in result.stdout
    train = [r for r in read_metrics(tmp_path / "solo") if r["kind"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]


@pytest.mark.parametrize("args,message", [
    (["--model.dim", "wide"], "config: model.dim must be int, got 'wide'"),
    (["--parallel.ep", "2"], "config: parallel.ep = 2 must divide the world size 1"),
    (["--data.path", "/nonexistent"], "/nonexistent"),
    (["--bogus"], "train: unknown option '--bogus'"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    result = run_trainer(trainer_command() + ["--metrics.runs_dir", str(tmp_path), *args])
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


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
