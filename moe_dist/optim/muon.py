"""Muon on the hidden matrices, AdamW on the rest, in one optimizer; exact under FSDP2 and expert parallelism.

Each matrix's update is torch.optim.Muon's (momentum, Nesterov, torch's Newton-Schulz, and Moonlight's scaling
to AdamW's update RMS, `match_rms_adamw`, so that AdamW's lr and weight decay carry over), computed once in the
world on the rank `MuonPlan` gives it. The momentum stays sharded like its parameter (one state per parameter,
where AdamW keeps two), so checkpoints save and reshard it as they do AdamW's states.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn
# torch.optim.Muon's own Newton-Schulz, coefficients and lr scaling (it takes only whole 2-D tensors, so its step
# cannot run on shards): the same functions, so that each matrix's update is torch's bit for bit.
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _adjust_lr, _zeropower_via_newtonschulz

from moe_dist.config import OptimConfig
from moe_dist.model import Transformer, hidden_matrices
from moe_dist.optim.adamw import adamw_groups
from moe_dist.optim.muon_plan import Matrix, MuonPlan, Piece
from moe_dist.parallel import local_part

NS_COEFFICIENTS = (DEFAULT_A, DEFAULT_B, DEFAULT_C)
LR_SCALING = "match_rms_adamw"


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on the param group marked "muon" (2-D weights and [E, a, b] expert stacks: E matrices), AdamW on the
    others: one optimizer, so that one lr schedule, one state dict and one checkpoint hold both."""

    def __init__(self, matrices: list[nn.Parameter], other_groups: list[dict], cfg: OptimConfig, fused: bool):
        self.adamw = torch.optim.AdamW([{**g, "muon": False} for g in other_groups], lr=cfg.lr,
                                       betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)
        muon = {"params": matrices, "muon": True, "weight_decay": cfg.weight_decay, "momentum": cfg.momentum,
                "nesterov": True, "ns_steps": cfg.ns_steps}
        super().__init__([muon] + self.adamw.param_groups, self.adamw.defaults)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.plan = MuonPlan(matrices, rank, world, cfg.ns_steps)

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "MuonWithAdamW.step takes no closure"
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group)
        # AdamW's step on the other groups and this optimizer's state, as they are now: load_state_dict replaces both.
        self.adamw.param_groups = [g for g in self.param_groups if not g["muon"]]
        self.adamw.state = self.state
        self.adamw.step()

    def _muon_step(self, group: dict) -> None:
        lr, momentum, params = group["lr"], group["momentum"], group["params"]
        grads, buffers = [], []
        for p in params:
            if p.grad is None:
                raise RuntimeError(f"Muon: a matrix of shape {tuple(p.shape)} has no gradient: every rank must step "
                                   f"every matrix, or the all-to-alls would not match")
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            grads.append(local_part(p.grad))
            buffers.append(local_part(state["momentum_buffer"]).lerp_(grads[-1], 1 - momentum))
            local_part(p).mul_(1 - lr * group["weight_decay"])

        def update(matrix: Matrix, piece: Piece) -> torch.Tensor:
            """A piece's Nesterov update, in the bf16 Newton-Schulz starts with; elementwise, so cut as it likes."""
            grad, buf = grads[matrix.param][piece.local], buffers[matrix.param][piece.local]
            return (grad.lerp(buf, momentum) if group["nesterov"] else buf).bfloat16()

        newton_schulz = functools.partial(_zeropower_via_newtonschulz, ns_coefficients=NS_COEFFICIENTS,
                                          ns_steps=group["ns_steps"], eps=EPS)
        for matrix, piece, ortho in self.plan.orthogonalise(update, newton_schulz):
            local_part(params[matrix.param])[piece.local].add_(ortho, alpha=-_adjust_lr(lr, LR_SCALING, matrix.shape))


def build_muon(model: Transformer, cfg: OptimConfig, device: torch.device) -> MuonWithAdamW:
    matrices = hidden_matrices(model)
    chosen = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    return MuonWithAdamW(matrices, adamw_groups(rest, cfg), cfg, fused=device.type == "cuda")
