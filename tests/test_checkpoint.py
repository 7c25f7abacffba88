"""Checkpoints: bit-exact resume, resharding, crash recovery, corruption, pruning (preemption: test_launch)."""

import os
import signal
import subprocess

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from distributed import run_on_ranks
from equivalence import full_parameters, global_batches, small_config, split
from moe_dist.checkpoint import Checkpointer, latest_checkpoint, verify
from moe_dist.config import to_toml
from moe_dist.optim import build_optimizer, build_scheduler
from moe_dist.parallel.mesh import Runtime, build_mesh
from moe_dist.train import build_model, train_step
from runs import (SMALL_MODEL, checkpoint_weights, start_trainer, train_in_process, train_losses, train_on_ranks,
                  trainer_args, trainer_command, wait_for)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_bit_exact(tmp_path, prepared_data, optimizer):
    common = [*SMALL_MODEL, "--checkpoint.interval", "10", "--checkpoint.keep_last", "5", "--optim.name", optimizer]
    straight = train_in_process(trainer_args(tmp_path / "a", prepared_data, "--train.steps", "20",
                                                           *common))
    assert straight.returncode == 0, straight.stderr[-2000:]
    first = train_in_process(trainer_args(tmp_path / "b", prepared_data, "--train.steps", "20",
                                                        "--train.stop_after", "10", *common))
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = train_in_process(trainer_args(tmp_path / "b", prepared_data, "--train.steps", "20",
                                                          "--resume", *common))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "step-10" in resumed.stdout
    a, b = train_losses(tmp_path / "a" / "tiny"), train_losses(tmp_path / "b" / "tiny")
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert a == b  # identical floats, every step
    wa = checkpoint_weights(tmp_path / "a" / "tiny" / "checkpoints" / "step-20")
    wb = checkpoint_weights(tmp_path / "b" / "tiny" / "checkpoints" / "step-20")
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


# --- resharding: save at world 4 / ep 4, load at world 2 / ep 2 and world 1 ---

def _setup(rank, world_size, ep, cfg):
    cfg.parallel.ep = ep
    model = build_model(cfg, build_mesh(cfg, world_size, "cpu"),
                        Runtime(rank, world_size, rank, torch.device("cpu")))
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    return model, optimizer, scheduler


def _step(model, optimizer, scheduler, cfg, windows, rank, world_size):
    per_rank = windows.shape[1] // world_size
    micro = [split(b[rank * per_rank:(rank + 1) * per_rank]) for b in windows]
    return train_step(model, optimizer, scheduler, micro, cfg.optim.grad_clip).loss


def save_worker(rank, world_size, ep, cfg, batches, run_dir):
    model, optimizer, scheduler = _setup(rank, world_size, ep, cfg)
    for windows in batches[:2]:
        _step(model, optimizer, scheduler, cfg, windows, rank, world_size)
    train_state = {"step": 2, "tokens": 0, "data": {"epoch": 0, "position": 8}}
    Checkpointer(run_dir, cfg.checkpoint, rank, world_size).save(2, model, optimizer, scheduler, train_state)
    saved = full_parameters(model), full_optimizer_state(model, optimizer)
    return saved, _step(model, optimizer, scheduler, cfg, batches[2], rank, world_size)


def load_worker(rank, world_size, ep, cfg, batches, run_dir):
    model, optimizer, scheduler = _setup(rank, world_size, ep, cfg)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint, rank, world_size)
    state = checkpointer.load(latest_checkpoint(checkpointer.root), model, optimizer, scheduler)
    assert state["step"] == 2 and scheduler.last_epoch == 2
    loaded = full_parameters(model), full_optimizer_state(model, optimizer)
    return loaded, _step(model, optimizer, scheduler, cfg, batches[2], rank, world_size)


def full_optimizer_state(model, optimizer) -> dict[str, torch.Tensor]:
    """Every optimizer state tensor, unsharded, by parameter name and state name."""
    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))["state"]
    return {f"{name}.{key}": torch.as_tensor(value).clone() for name, states in state.items()
            for key, value in states.items()}


@pytest.mark.slow
def test_reshard_world4_ep4_to_world2_ep2_and_world1(tmp_path):
    # Muon: its momenta on the hidden matrices (experts included) and AdamW's two moments and step on the rest, both
    # kinds of state over every placement the model has.
    cfg = small_config(**{"train.steps": "3", "moe.top_k": "2", "moe.aux_free_bias": "true", "optim.name": "muon"})
    batches = global_batches(cfg, 3, 4)  # [steps, grad_accum = 1, 4 * MICRO_BATCH, seq_len + 1]
    (tmp_path / "config.toml").write_text(to_toml(cfg))
    saved, next_loss = run_on_ranks(save_worker, 4, 4, cfg, batches, tmp_path)[0]
    verify(latest_checkpoint(tmp_path / "checkpoints"))
    for world_size, ep in ((2, 2), (1, 1)):
        loaded, loss = run_on_ranks(load_worker, world_size, ep, cfg, batches, tmp_path)[0]
        for got, want in zip(loaded, saved):  # the weights, then the optimizer's states (Muon: one per matrix)
            assert got.keys() == want.keys()
            for name in want:
                assert torch.equal(got[name], want[name]), (world_size, name)
        assert abs(loss - next_loss) <= 1e-6 * next_loss, (world_size, loss, next_loss)
    assert any(name.endswith("experts.w1.momentum_buffer") for name in saved[1])
    assert any(name.endswith("router.gate.weight.exp_avg_sq") for name in saved[1])


# --- crash recovery under torchrun ---

def _worker_pids(torchrun_pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(torchrun_pid)], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in children]


CRASH_ARGS = [*SMALL_MODEL, "--train.steps", "24", "--checkpoint.interval", "4", "--checkpoint.resume", "auto",
              "--train.eval_interval", "0"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, prepared_data):
    """Losses of the crash tests' run on 2 ranks with nothing killed (forked ranks: torchrun is what the tests
    check, not this run)."""
    runs_dir = tmp_path_factory.mktemp("uninterrupted")
    result = train_on_ranks(trainer_args(runs_dir, prepared_data, *CRASH_ARGS), 2)
    assert result.returncode == 0, result.stderr[-3000:]
    return train_losses(runs_dir / "tiny")


@pytest.mark.slow
@pytest.mark.parametrize("during_save", [False, True])
def test_sigkill_a_rank_restarts_from_last_checkpoint(tmp_path, prepared_data, uninterrupted, during_save):
    args = CRASH_ARGS
    proc = start_trainer(trainer_command(2, max_restarts=1) + trainer_args(tmp_path / "crash", prepared_data, *args))
    run_dir = tmp_path / "crash" / "tiny"
    if during_save:  # kill while the step-12 checkpoint is being written (just after, if a poll missed it)
        checkpoints = run_dir / "checkpoints"
        wait_for(lambda: (checkpoints / ".step-12.tmp").exists() or (checkpoints / "step-12").exists(), proc)
    else:
        wait_for(lambda: max(train_losses(run_dir), default=0) >= 10, proc)
    os.kill(_worker_pids(proc.pid)[-1], signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("resuming from") == 1
    resumed_from = int(out.split("resuming from")[1].split("step-")[1].split()[0])
    assert resumed_from in (4, 8, 12)
    verify(latest_checkpoint(run_dir / "checkpoints"))
    ref, got = uninterrupted, train_losses(run_dir)
    assert sorted(got) == list(range(1, 25))
    for step in range(resumed_from + 1, 25):  # the trajectory after the restart
        assert got[step] == ref[step], (step, got[step], ref[step])


# --- corruption, pruning, async ---

@pytest.mark.slow
def test_corrupt_newest_checkpoint(tmp_path, prepared_data):
    args = [*SMALL_MODEL, "--train.steps", "6", "--checkpoint.interval", "2", "--checkpoint.keep_last", "3"]
    first = train_in_process(trainer_args(tmp_path, prepared_data, *args))
    assert first.returncode == 0, first.stderr[-2000:]
    checkpoints = tmp_path / "tiny" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-2", "step-4", "step-6"]
    shard = next((checkpoints / "step-6").glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)

    more = [*SMALL_MODEL, "--train.steps", "8", "--checkpoint.keep_last", "3"]
    strict = train_in_process(trainer_args(tmp_path, prepared_data, *more, "--resume"))
    assert strict.returncode == 2
    assert str(shard) in strict.stderr and len(strict.stderr.strip().splitlines()) == 1, strict.stderr

    auto = train_in_process(trainer_args(tmp_path, prepared_data, *more, "--checkpoint.resume", "auto"))
    assert auto.returncode == 0, auto.stderr[-2000:]
    assert str(shard) in auto.stdout and "falling back" in auto.stdout
    assert "resuming from" in auto.stdout and "checkpoints/step-4\n" in auto.stdout

    shard.unlink()
    (checkpoints / "step-8" / "COMPLETE").unlink()  # as if killed before it was finished
    deleted = train_in_process(trainer_args(tmp_path, prepared_data, *more, "--resume"))
    assert deleted.returncode == 2 and "incomplete" in deleted.stderr


@pytest.mark.slow
def test_async_save_and_keep_last(tmp_path, prepared_data):
    args = ["--train.steps", "10", "--checkpoint.interval", "2", "--checkpoint.keep_last", "2",
            "--checkpoint.async_save", "true"]
    result = train_in_process(trainer_args(tmp_path, prepared_data, *args))
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoints = tmp_path / "tiny" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-10", "step-8"]
    assert not list(checkpoints.glob(".*.tmp"))
    assert latest_checkpoint(checkpoints).name == "step-10"
    for path in checkpoints.glob("step-*"):
        verify(path)
