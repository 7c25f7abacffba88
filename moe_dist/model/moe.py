"""MoE feed-forward: router + grouped SwiGLU experts (+ optional shared expert) + a dispatcher."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from kernels.grouped_mm import grouped_swiglu
from kernels.routing import plan_routing, permute, unpermute
from moe_dist.config import MoEConfig
from moe_dist.model.router import Router, RouterOutput


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as [E, ...] tensors, run on rows grouped by expert."""

    def __init__(self, num_experts: int, dim: int, hidden: int, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))

    def forward(self, rows: Tensor, counts: Tensor) -> Tensor:
        """rows [N, D] grouped by this process's experts, counts [E_local] -> [N, D]."""
        # Sharded from the outside (expert parallelism), the weights are DTensors: use the local experts.
        w1, w3, w2 = (w.to_local() if isinstance(w, DTensor) else w for w in (self.w1, self.w3, self.w2))
        return grouped_swiglu(rows, w1, w3, w2, counts, self.backend)


class Dispatcher(Protocol):
    def __call__(self, tokens: Tensor, route: RouterOutput, experts: GroupedExperts) -> Tensor: ...


def local_dispatch(tokens: Tensor, route: RouterOutput, experts: GroupedExperts) -> Tensor:
    """All experts on this process: permute, grouped GEMMs, unpermute."""
    plan = plan_routing(route.expert_ids, route.counts.numel(), route.keep)
    rows = experts(permute(tokens, plan), plan.counts)
    return unpermute(rows, plan, route.weights)


class MoE(nn.Module):
    """Replaces the dense FFN of a block. Returns (output, aux_loss).

    `dispatch` moves tokens to their experts and back; the expert-parallel module swaps in an
    all-to-all one, the model code stays the same.
    """

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.router = Router(dim, cfg)
        self.experts = GroupedExperts(cfg.num_experts, dim, cfg.expert_hidden, cfg.grouped_mm_backend)
        self.shared_expert = FeedForward(dim, cfg.shared_expert_hidden) if cfg.shared_expert_hidden else None
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False) if cfg.shared_expert_gate else None
        self.dispatch: Dispatcher = local_dispatch
        # Read by the trainer after each forward, for metrics and the aux-free bias update.
        self.last_counts: Tensor | None = None  # [E] pairs routed per expert, whole batch
        self.last_dropped: Tensor | None = None  # pairs dropped by capacity on this rank

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        batch, seq_len, dim = x.shape
        tokens = x.reshape(-1, dim)
        route = self.router(tokens, seq_len)
        self.last_counts = route.counts
        self.last_dropped = (~route.keep).sum() if route.keep is not None else torch.zeros((), dtype=torch.int64)
        out = self.dispatch(tokens, route, self.experts)
        if self.shared_expert is not None:
            shared = self.shared_expert(tokens)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(tokens)) * shared
            out = out + shared
        return out.view(batch, seq_len, dim), route.aux_loss


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]
