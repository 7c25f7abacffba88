"""Token permutation for MoE: group the (token, expert) pairs by expert, and back.

`plan_routing` sorts the T*k pairs by expert once; `permute` gathers token rows into that order
and `unpermute` gathers expert outputs back, weighting and summing the k choices per token. Both
directions are gathers (no scatter-add, no atomics), so forward and backward are deterministic,
and `unpermute` saves no [T*k, D] intermediate for backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RoutingPlan:
    """Where each (token, choice) pair sits after sorting by expert."""

    counts: Tensor  # [E] int64, rows per expert in sorted order
    pair_of_row: Tensor  # [N] flat pair index (token * k + choice) of each sorted row
    row_of_pair: Tensor  # [T, k] sorted row of each pair, -1 where the pair was dropped

    @property
    def top_k(self) -> int:
        return self.row_of_pair.shape[1]

    @property
    def token_of_row(self) -> Tensor:
        return self.pair_of_row // self.top_k


def plan_routing(expert_ids: Tensor, num_experts: int, keep: Tensor | None = None) -> RoutingPlan:
    """Stable-sort the pairs of `expert_ids [T, k]` by expert; pairs where `keep` is False are dropped."""
    num_tokens, top_k = expert_ids.shape
    flat = expert_ids.reshape(-1)
    num_rows = flat.numel()
    if keep is not None:
        flat = torch.where(keep.reshape(-1), flat, num_experts)  # dropped pairs sort last
        num_rows = int(keep.sum())  # the one host sync, only in capacity mode
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    pair_of_row = torch.argsort(flat, stable=True)[:num_rows]
    row_of_pair = torch.full_like(flat, -1)
    row_of_pair[pair_of_row] = torch.arange(num_rows, device=flat.device)
    return RoutingPlan(counts[:num_experts], pair_of_row, row_of_pair.view(num_tokens, top_k))


def _gather_pairs(rows: Tensor, plan: RoutingPlan) -> Tensor:
    """rows [N, D] in sorted order -> [T, k, D] per pair; dropped pairs are zero."""
    num_tokens, top_k = plan.row_of_pair.shape
    if rows.shape[0] == 0:
        return rows.new_zeros(num_tokens, top_k, rows.shape[1])
    index = plan.row_of_pair.clamp(min=0).reshape(-1)
    pairs = rows.index_select(0, index).view(num_tokens, top_k, rows.shape[1])
    if rows.shape[0] < plan.row_of_pair.numel():  # some pairs were dropped
        pairs = pairs * (plan.row_of_pair >= 0).unsqueeze(-1).to(pairs.dtype)
    return pairs


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, plan: RoutingPlan) -> Tensor:
        ctx.plan = plan
        return x.index_select(0, plan.token_of_row)

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        # Each token's gradient is the sum over its k rows: a gather and a sum, not an index_add.
        return _gather_pairs(grad_rows.contiguous(), ctx.plan).sum(1), None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: Tensor, plan: RoutingPlan, weights: Tensor) -> Tensor:
        ctx.plan = plan
        ctx.save_for_backward(rows, weights)
        pairs = _gather_pairs(rows, plan)
        return torch.bmm(weights.to(rows.dtype).unsqueeze(1), pairs).squeeze(1)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        rows, weights = ctx.saved_tensors
        plan = ctx.plan
        grad_out = grad_out.contiguous()
        grad_rows = grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_pairs = weights.to(grad_out.dtype).unsqueeze(-1) * grad_out.unsqueeze(1)  # [T, k, D]
            grad_rows = grad_pairs.view(-1, grad_out.shape[1]).index_select(0, plan.pair_of_row)
        if ctx.needs_input_grad[2]:
            pairs = _gather_pairs(rows, plan)  # recomputed rather than saved from forward
            grad_weights = torch.bmm(pairs, grad_out.unsqueeze(-1)).squeeze(-1).to(weights.dtype)
        return grad_rows, None, grad_weights


def permute(x: Tensor, plan: RoutingPlan) -> Tensor:
    """Token rows `x [T, D]` -> rows grouped by expert `[N, D]` (N = kept pairs)."""
    return _Permute.apply(x, plan)


def unpermute(rows: Tensor, plan: RoutingPlan, weights: Tensor | None = None) -> Tensor:
    """Expert outputs `[N, D]` -> tokens `[T, D]`: sum over the k choices, weighted by `weights [T, k]`."""
    if weights is None:
        weights = torch.ones(plan.row_of_pair.shape, dtype=rows.dtype, device=rows.device)
    return _Unpermute.apply(rows, plan, weights)
