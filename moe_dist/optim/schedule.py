"""The learning-rate schedules (optim.schedule): warmup, then cosine, WSD, linear or constant."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from moe_dist.config import OptimConfig


# optim.decay_shape: the fraction of the way from min_lr_ratio to 1 still left, at progress p in [0, 1] of a decay.
DECAY_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda p: 1 - p,
    "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p)),
    "1-sqrt": lambda p: 1 - math.sqrt(p),
}


def decay(step: int, start: int, length: int, shape: str, min_lr_ratio: float) -> float:
    """The factor `step - start` steps into a decay of `length` steps from 1 to min_lr_ratio (held there after)."""
    progress = min(1.0, (step - start) / max(1, length))
    return min_lr_ratio + (1 - min_lr_ratio) * DECAY_SHAPES[shape](progress)


def _cosine(step: int, cfg: OptimConfig, total_steps: int) -> float:
    return decay(step, cfg.warmup_steps, total_steps - cfg.warmup_steps, "cosine", cfg.min_lr_ratio)


def _linear(step: int, cfg: OptimConfig, total_steps: int) -> float:
    return decay(step, cfg.warmup_steps, total_steps - cfg.warmup_steps, "linear", cfg.min_lr_ratio)


def _wsd(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Stable at 1, then the decay over the last steps: a longer train.steps moves the decay, not the past."""
    length = cfg.decay_length(total_steps)
    if step < total_steps - length:
        return 1.0
    return decay(step, total_steps - length, length, cfg.decay_shape, cfg.min_lr_ratio)


def _constant(step: int, cfg: OptimConfig, total_steps: int) -> float:
    return 1.0


# optim.schedule: the factor after the warmup, at optimizer steps taken `step` and train.steps `total_steps`.
SCHEDULES: dict[str, Callable[[int, OptimConfig, int], float]] = {
    "cosine": _cosine,
    "wsd": _wsd,
    "linear": _linear,
    "constant": _constant,
}


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Linear warmup to 1 over optim.warmup_steps, then optim.schedule's factor."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    return SCHEDULES[cfg.schedule](step, cfg, total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    # A plain function: LambdaLR checkpoints none of its state, so a resumed run follows its own config's schedule.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))


def resume_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """After a checkpoint's load: the next step's lr from this run's schedule, not the saved run's (they differ for
    a longer WSD run or a cool-down branch; where they agree it is the same value)."""
    groups = scheduler.optimizer.param_groups
    for group, base_lr, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base_lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports until the next step
