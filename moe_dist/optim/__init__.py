"""Optimizers (optim.name: one module each) and the learning-rate schedules."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moe_dist.config import OptimConfig
from moe_dist.optim.adamw import build_adamw
from moe_dist.optim.muon import build_muon
from moe_dist.optim.schedule import DECAY_SHAPES, SCHEDULES, build_scheduler, lr_factor, resume_schedule

OPTIMIZERS: dict[str, Callable[[nn.Module, OptimConfig, torch.device], torch.optim.Optimizer]] = {
    "adamw": build_adamw,
    "muon": build_muon,
}


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """optim.name's optimizer over `model`'s trainable parameters, after the model is parallelized."""
    return OPTIMIZERS[cfg.name](model, cfg, device)


__all__ = ["DECAY_SHAPES", "OPTIMIZERS", "SCHEDULES", "build_optimizer", "build_scheduler", "lr_factor",
           "resume_schedule"]
