"""Learning-rate schedules against their closed forms; a WSD run extended by resuming; a cool-down branch."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from moe_dist import train
from moe_dist.config import CHOICES, ConfigError, OptimConfig, load_config, parse_args
from moe_dist.optim import DECAY_SHAPES, SCHEDULES, build_scheduler, lr_factor, resume_schedule
from moe_dist.startup import check_run, schedule_change
from runs import SMALL_MODEL, corrupt_in_place, read_metrics, train_in_process, tree_state, trainer_args


def old_cosine(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """The schedule before optim.schedule existed, as it was written."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def expected_factor(step: int, cfg: OptimConfig, total: int) -> float:
    """Each schedule written out: warmup, then its own curve."""
    w, m = cfg.warmup_steps, cfg.min_lr_ratio
    if step < w:
        return (step + 1) / w
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "linear":
        return m + (1 - m) * (1 - min(1.0, (step - w) / max(1, total - w)))
    decay = cfg.decay_steps or max(1, round(cfg.decay_fraction * total))  # wsd
    if step < total - decay:
        return 1.0
    p = min(1.0, (step - (total - decay)) / decay)
    left = {"linear": 1 - p, "cosine": (1 + math.cos(math.pi * p)) / 2, "1-sqrt": 1 - math.sqrt(p)}
    return m + (1 - m) * left[cfg.decay_shape]


CURVES = [(3, 0.1, 40), (0, 0.0, 17), (10, 0.5, 100), (1, 0.1, 2)]  # warmup, min_lr_ratio, train.steps


def test_every_schedule_and_shape_is_a_choice():
    assert tuple(SCHEDULES) == CHOICES["optim.schedule"] and tuple(DECAY_SHAPES) == CHOICES["optim.decay_shape"]


@pytest.mark.parametrize("warmup,min_ratio,total", CURVES)
def test_cosine_is_the_schedule_it_was_bit_for_bit(warmup, min_ratio, total):
    cfg = OptimConfig(warmup_steps=warmup, min_lr_ratio=min_ratio)
    assert all(lr_factor(s, cfg, total) == old_cosine(s, cfg, total) for s in range(total + 3))


@pytest.mark.parametrize("schedule,shape,decay_steps", [
    ("linear", "linear", 0), ("constant", "linear", 0), ("wsd", "linear", 0), ("wsd", "cosine", 0),
    ("wsd", "1-sqrt", 0), ("wsd", "linear", 1), ("wsd", "1-sqrt", 5)])
@pytest.mark.parametrize("warmup,min_ratio,total", CURVES)
def test_schedule_follows_its_closed_form(schedule, shape, decay_steps, warmup, min_ratio, total):
    cfg = OptimConfig(warmup_steps=warmup, min_lr_ratio=min_ratio, schedule=schedule, decay_shape=shape,
                      decay_steps=min(decay_steps, total - warmup))
    for step in range(total + 3):
        assert lr_factor(step, cfg, total) == pytest.approx(expected_factor(step, cfg, total), rel=1e-12, abs=1e-15)
    assert lr_factor(total, cfg, total) == pytest.approx(1.0 if schedule == "constant" else min_ratio)


def test_wsd_holds_then_decays_over_the_last_steps():
    cfg = OptimConfig(warmup_steps=2, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.25)
    factors = [lr_factor(s, cfg, 40) for s in range(41)]
    assert factors[2:31] == [1.0] * 29 and factors[31] < 1.0 and factors[40] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(factors[30:40], factors[31:41]))
    # Longer: the stable phase goes on, the decay moves to the new end; nothing before it changes.
    assert [lr_factor(s, cfg, 80) for s in range(41)][:31] == factors[:31]
    assert lr_factor(60, cfg, 80) == 1.0 and lr_factor(80, cfg, 80) == pytest.approx(0.1)


@pytest.mark.parametrize("overrides,message", [
    ({"optim.schedule": "wsd", "train.steps": "8", "optim.decay_steps": "7", "optim.warmup_steps": "2"},
     "config: optim.decay_steps = 7 must fit in train.steps = 8 after optim.warmup_steps = 2"),
    ({"optim.schedule": "wsd", "train.steps": "10", "optim.decay_fraction": "0.5"},
     "config: optim.decay_fraction = 0.5 (5 steps) must fit in train.steps = 10 after optim.warmup_steps = 10"),
    ({"optim.decay_fraction": "0"}, "config: optim.decay_fraction = 0.0 must be in (0, 1]"),
    ({"optim.decay_shape": "sqrt"}, "config: optim.decay_shape = 'sqrt' is not one of 'linear', 'cosine', '1-sqrt'"),
    ({"optim.schedule": "step"}, "config: optim.schedule = 'step' is not one of 'cosine', 'wsd', 'linear'"),
    ({"train.branch_from": "runs/a", "train.init_from": "hf/model"},
     "config: train.branch_from and train.init_from exclude each other"),
])
def test_bad_schedule_config_is_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_loaded_scheduler_follows_this_runs_schedule():
    saved_cfg = OptimConfig(warmup_steps=1, schedule="wsd", decay_steps=4, min_lr_ratio=0.1)
    weight = torch.nn.Parameter(torch.ones(1))
    optimizer = torch.optim.AdamW([weight], lr=0.5)
    scheduler = build_scheduler(optimizer, saved_cfg, 8)
    for _ in range(6):
        optimizer.step()
        scheduler.step()
    state = (optimizer.state_dict(), scheduler.state_dict())
    for total in (8, 20):  # as saved; and extended: step 6 is back in the stable phase
        optimizer = torch.optim.AdamW([weight], lr=0.5)
        scheduler = build_scheduler(optimizer, saved_cfg, total)
        optimizer.load_state_dict(state[0])
        scheduler.load_state_dict(state[1])
        resume_schedule(scheduler)
        expected = 0.5 * lr_factor(6, saved_cfg, total)
        assert optimizer.param_groups[0]["lr"] == scheduler.get_last_lr()[0] == expected
    assert expected == 0.5


def test_a_jump_out_of_the_decay_is_warned_about():
    saved = load_config("tiny", {"optim.schedule": "wsd", "train.steps": "100", "optim.decay_steps": "20"})
    longer = load_config("tiny", {"optim.schedule": "wsd", "train.steps": "200", "optim.decay_steps": "20"})
    assert schedule_change(saved, 80, longer) is None  # the decay had not begun: the stable phase goes on
    assert schedule_change(saved, 90, saved) is None  # the same schedule
    assert schedule_change(saved, 5, longer) is None  # in the warmup
    assert schedule_change(saved, 90, longer) == (
        "warning: step 90 is inside the decay of the checkpoint's schedule (optim.schedule = 'wsd', train.steps = "
        "100): this config's schedule moves the lr factor there from 0.55 to 1")


# --- end to end: a WSD run A extended by resuming, and a cool-down B branched from its stable phase ---------------

WSD = ["--optim.schedule", "wsd", "--optim.warmup_steps", "2", "--optim.decay_steps", "4", "--optim.lr", "1e-2",
       "--checkpoint.interval", "2", "--checkpoint.keep_last", "8", *SMALL_MODEL]


def trainer(runs: Path, data: Path, *args: str) -> str:
    """Run the trainer to the end; its stdout and stderr."""
    result = train_in_process(trainer_args(runs, data, *WSD, *args))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def train_records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if r["kind"] == "train"}


def lrs(steps: range, total: int) -> list[float]:
    """WSD's lr at these steps for train.steps = total."""
    cfg = load_config("tiny", {"optim.schedule": "wsd", "optim.warmup_steps": "2", "optim.decay_steps": "4"}).optim
    return [1e-2 * lr_factor(s, cfg, total) for s in steps]


@pytest.fixture(scope="module")
def wsd_run(tmp_path_factory, prepared_data) -> tuple[Path, str]:
    """Run A: WSD for 8 steps, stopped at step 4 (where its decay would begin), then resumed with train.steps 12;
    every second step checkpointed and kept. Its dir and the resumed run's output."""
    runs = tmp_path_factory.mktemp("schedule")
    trainer(runs, prepared_data, "--train.name", "A", "--train.steps", "8", "--train.stop_after", "4")
    return runs / "A", trainer(runs, prepared_data, "--train.name", "A", "--train.steps", "12", "--resume")


@pytest.fixture(scope="module")
def cool_down(wsd_run, prepared_data) -> tuple[Path, str, bool]:
    """Run B: branched from A's step 4 with A's first schedule (8 steps, the last 4 decaying). Its dir, its output,
    and whether A's files were left as they were."""
    source = tree_state(wsd_run[0])
    out = trainer(wsd_run[0].parent, prepared_data, "--train.name", "B", "--train.steps", "8",
                  "--train.branch_from", str(wsd_run[0] / "checkpoints" / "step-4"))
    return wsd_run[0].parent / "B", out, tree_state(wsd_run[0]) == source


@pytest.mark.slow
def test_a_wsd_run_resumed_longer_stays_stable(wsd_run):
    run_dir, out = wsd_run
    assert "resuming from" in out and "warning" not in out  # step 4 is where the 8-step decay would begin: no jump
    lr = {step: record["lr"] for step, record in train_records(run_dir).items()}
    assert [lr[s] for s in range(1, 13)] == lrs(range(1, 13), 12)
    assert [lr[s] for s in range(4, 8)] == [1e-2] * 4 and lr[12] == pytest.approx(1e-3)


@pytest.mark.slow
def test_a_branch_starts_where_its_checkpoint_is(wsd_run, cool_down, prepared_data):
    (a_dir, _), (b_dir, out, source_untouched) = wsd_run, cool_down
    assert f"branching from {a_dir / 'checkpoints' / 'step-4'}" in out and "warning" not in out
    a, b = train_records(a_dir), train_records(b_dir)
    assert sorted(b) == [5, 6, 7, 8] and [b[s]["tokens"] for s in b] == [a[s]["tokens"] for s in b]
    assert [b[s]["lr"] for s in b] == lrs(range(5, 9), 8)
    # Step 5 updates with the same lr in A and B (the factor at step 4 is 1 in both schedules): from the same
    # weights, Adam moments and data position, the loss after it is the same, bit for bit.
    assert [b[s]["loss"] for s in (5, 6)] == [a[s]["loss"] for s in (5, 6)] and b[7]["loss"] != a[7]["loss"]
    assert source_untouched
    # With a checkpoint of its own, the branch resumes from it and never reads train.branch_from again.
    argv = ["--preflight", "--resume", *trainer_args(b_dir.parent, prepared_data, *WSD, "--train.name", "B",
                                                     "--train.steps", "10", "--train.branch_from", "gone")]
    assert train.main(argv) == 0


def refused(capsys, argv: list[str], message: str, *roots: Path) -> None:
    """The trainer's checks refuse argv with one line holding message, and write nothing under roots."""
    capsys.readouterr()
    before = tree_state(*roots)
    assert train.main(["--preflight", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert tree_state(*roots) == before


@pytest.mark.slow
def test_branch_checks(capsys, tmp_path, wsd_run, cool_down, prepared_data):
    """A bad branch is refused before any write; a branch out of the source's decay is warned about."""
    runs, a_dir, b_dir = wsd_run[0].parent, wsd_run[0], cool_down[0]

    def args(branch_from: Path, *more: str) -> list[str]:
        return trainer_args(runs, prepared_data, *WSD, "--train.name", "C", "--train.steps", "8",
                            "--train.branch_from", str(branch_from), *more)

    step4 = a_dir / "checkpoints" / "step-4"
    refused(capsys, args(step4, "--train.steps", "4", "--optim.decay_steps", "2"),
            f"config: train.steps = 4 must be more than the step of train.branch_from = {step4} (4)", runs)
    refused(capsys, args(tmp_path / "nowhere"), "no such directory", runs)
    refused(capsys, args(step4, "--model.dim", "32"), f"checkpoint {step4}: model.dim = 64 there, 32 in this config",
            runs)
    own = trainer_args(runs, prepared_data, *WSD, "--train.name", "A", "--train.branch_from", str(step4))
    refused(capsys, [*own, "--overwrite"], "is inside this run's dir", runs)
    copy = tmp_path / "copy"
    shutil.copytree(a_dir, copy)
    corrupt_in_place(copy / "checkpoints" / "step-12")
    refused(capsys, args(copy), f"train.branch_from = {copy}: checkpoint {copy / 'checkpoints' / 'step-12'}: file",
            runs, copy)
    (copy / "tokenizer.json").write_text("{}")
    refused(capsys, args(copy / "checkpoints" / "step-4"), f"was tokenized with another tokenizer than "
                                                           f"{copy / 'tokenizer.json'}", runs, copy)
    assert not (runs / "C").exists()
    overrides = parse_args(args(b_dir / "checkpoints" / "step-6", "--train.steps", "12"), "train")[1]
    check_run(load_config("tiny", overrides), 0, 1, resume=False, overwrite=False, announce=True)
    assert capsys.readouterr().err == ("warning: step 6 is inside the decay of the checkpoint's schedule "
                                       "(optim.schedule = 'wsd', train.steps = 8): this config's schedule moves the lr "
                                       "factor there from 0.55 to 1\n")
