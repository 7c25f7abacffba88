"""MoE feed-forward: router + grouped gated experts (+ optional shared expert) + an exchange."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from kernels.activation import SWIGLU, GatedActivation
from kernels.grouped_mm import grouped_swiglu
from kernels.routing import plan_routing, permute, unpermute
from moe_dist.config import MoEConfig
from moe_dist.model.router import Router


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class Exchange(Protocol):
    """Carries rows, grouped as `group_of` orders them, to their experts and back.

    It runs `alongside` (the shared expert) while rows are in flight and returns its result too.
    """

    def group_of(self, expert_ids: Tensor) -> tuple[Tensor, int]:
        """[T, k] expert ids -> ([T, k] the group each (token, choice) pair is sorted into, how many groups)."""
        ...

    def __call__(self, rows: Tensor, counts: Tensor, compute: Callable[[Tensor, Tensor], Tensor],
                 alongside: Callable[[], Tensor] | None) -> tuple[Tensor, Tensor | None]: ...


class LocalExchange:
    """Every expert on this process: the groups are the experts, nothing moves."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def group_of(self, expert_ids: Tensor) -> tuple[Tensor, int]:
        return expert_ids, self.num_experts

    def __call__(self, rows: Tensor, counts: Tensor, compute: Callable[[Tensor, Tensor], Tensor],
                 alongside: Callable[[], Tensor] | None) -> tuple[Tensor, Tensor | None]:
        return compute(rows, counts), alongside() if alongside is not None else None


class GroupedExperts(nn.Module):
    """E gated experts stored as [E, ...] tensors, run on rows grouped by expert: act(x w1 + b1, x w3 + b3) w2 + b2,
    the biases (w1_bias, w3_bias [E, hidden], w2_bias [E, dim]) only with `biases`.

    `forward` hands the rows to an exchange, which brings each group to the process holding its
    expert and calls `compute` there. Keeping the exchange inside this module's forward means a
    wrapper such as FSDP sees one call per layer however many chunks the exchange cuts the rows into.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, backend: str = "auto", biases: bool = False,
                 act: GatedActivation = SWIGLU):
        super().__init__()
        self.backend = backend
        self.act = act
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        # Per-expert like the weights: whatever shards the experts shards these on dim 0 alike.
        for name, size in (("w1_bias", hidden), ("w3_bias", hidden), ("w2_bias", dim)):
            self.register_parameter(name, nn.Parameter(torch.empty(num_experts, size)) if biases else None)

    def forward(self, rows: Tensor, counts: Tensor, exchange: Exchange,
                alongside: Callable[[], Tensor] | None = None) -> tuple[Tensor, Tensor | None]:
        """rows [N, D] grouped as `exchange.group_of` says, counts [groups] -> ([N, D], alongside())."""
        return exchange(rows, counts, self.compute, alongside)

    def compute(self, rows: Tensor, counts: Tensor) -> Tensor:
        """rows [N, D] grouped by this process's experts, counts [E_local] -> [N, D]."""
        # Sharded from the outside (expert parallelism), the weights are DTensors: use the local experts.
        w1, w3, w2 = (_local(w) for w in (self.w1, self.w3, self.w2))
        biases = None if self.w1_bias is None else tuple(_local(b) for b in (self.w1_bias, self.w3_bias, self.w2_bias))
        return grouped_swiglu(rows, w1, w3, w2, counts, self.backend, biases=biases, act=self.act)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class MoEStats(NamedTuple):
    """What one MoE layer's router did in one forward, returned beside the layer's output rather than stored on the
    module: a forward that writes no module state is recomputed by activation checkpointing without writing it
    again, and traced by torch.compile without side effects to replay (dynamo refuses them inside a checkpoint)."""

    aux_loss: Tensor  # scalar, the router's coefficiented auxiliary losses
    counts: Tensor  # [E] float, pairs routed to each expert over the whole (reduced) batch
    dropped: Tensor  # scalar int64, pairs dropped by capacity on this process


class MoE(nn.Module):
    """Replaces the dense FFN of a block. Returns (output, MoEStats).

    The layer routes, sorts the (token, choice) pairs into groups, gathers the token rows in that
    order (permute), and sums each token's k expert outputs back (unpermute). `exchange` only moves
    grouped rows to their experts and back; the expert-parallel module swaps in an all-to-all one.
    """

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.router = Router(dim, cfg)
        self.experts = GroupedExperts(cfg.num_experts, dim, cfg.expert_hidden, cfg.grouped_mm_backend,
                                      cfg.expert_biases, GatedActivation(cfg.expert_act, cfg.swiglu_alpha,
                                                                         cfg.swiglu_limit))
        self.shared_expert = FeedForward(dim, cfg.shared_expert_hidden) if cfg.shared_expert_hidden else None
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False) if cfg.shared_expert_gate else None
        self.exchange: Exchange = LocalExchange(cfg.num_experts)

    def forward(self, x: Tensor) -> tuple[Tensor, MoEStats]:
        batch, seq_len, dim = x.shape
        tokens = x.reshape(-1, dim)
        route = self.router(tokens, seq_len)
        dropped = (~route.keep).sum() if route.keep is not None else tokens.new_zeros((), dtype=torch.int64)
        plan = plan_routing(*self.exchange.group_of(route.expert_ids), route.keep)
        shared = functools.partial(self.shared, tokens) if self.shared_expert is not None else None
        rows, shared_out = self.experts(permute(tokens, plan), plan.counts, self.exchange, shared)
        out = unpermute(rows, plan, route.weights)
        if shared_out is not None:
            out = out + shared_out
        return out.view(batch, seq_len, dim), MoEStats(route.aux_loss, route.counts, dropped)

    def shared(self, tokens: Tensor) -> Tensor:
        """The shared expert, sigmoid-gated where configured: every token goes through it."""
        out = self.shared_expert(tokens)
        if self.shared_expert_gate is not None:
            out = torch.sigmoid(self.shared_expert_gate(tokens)) * out
        return out


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]
