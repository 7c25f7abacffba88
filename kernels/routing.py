"""Token permutation for MoE: group the (token, expert) pairs by expert, and back.

`capacity_keep` marks the pairs that fit an expert's capacity; `plan_routing` sorts the T*k pairs
into groups (experts, or whatever groups an exchange asks for) once; `permute` gathers token rows into that order
and `unpermute` gathers expert outputs back, weighting and summing the k choices per token. Both
directions are gathers (no scatter-add, no atomics), so forward and backward are deterministic.
The gather-and-sum steps are one `embedding_bag` each: no [T, k, D] intermediate is written,
and `unpermute` saves no [T*k, D] tensor for backward beyond its input rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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

    @property
    def dropped_any(self) -> bool:
        return self.pair_of_row.shape[0] < self.row_of_pair.numel()


def plan_routing(expert_ids: Tensor, num_experts: int, keep: Tensor | None = None) -> RoutingPlan:
    """Stable-sort the pairs of `expert_ids [T, k]` by expert (or group); pairs where `keep` is False are dropped."""
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


def capacity_keep(expert_ids: Tensor, seq_len: int, num_experts: int, capacity: int) -> Tensor:
    """True for the pairs that fit: the first `capacity` pairs, in token order, per (sequence, expert)."""
    num_tokens, top_k = expert_ids.shape
    sequence = torch.arange(num_tokens, device=expert_ids.device).div(seq_len, rounding_mode="floor")
    key = (sequence.unsqueeze(1) * num_experts + expert_ids).reshape(-1)
    order = torch.argsort(key, stable=True)
    group_sizes = torch.zeros(int(math.ceil(num_tokens / seq_len)) * num_experts, dtype=torch.int64,
                              device=key.device).scatter_add_(0, key, torch.ones_like(key))
    group_starts = torch.cumsum(group_sizes, 0) - group_sizes
    sorted_key = key[order]
    position = torch.empty_like(key)
    position[order] = torch.arange(key.numel(), device=key.device) - group_starts[sorted_key]
    return (position < capacity).view(num_tokens, top_k)


def _sum_pairs(rows: Tensor, plan: RoutingPlan, weights: Tensor | None) -> Tensor:
    """out[t] = sum_j weights[t, j] * rows[row_of_pair[t, j]] over the kept pairs: one embedding_bag."""
    num_tokens = plan.row_of_pair.shape[0]
    if rows.shape[0] == 0:
        return rows.new_zeros(num_tokens, rows.shape[1])
    if plan.dropped_any:  # dropped pairs point at row 0 with weight 0
        kept = (plan.row_of_pair >= 0).to(rows.dtype)
        weights = kept if weights is None else weights.to(rows.dtype) * kept
    elif weights is not None:
        weights = weights.to(rows.dtype)
    return F.embedding_bag(plan.row_of_pair.clamp(min=0), rows, mode="sum", per_sample_weights=weights)


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, plan: RoutingPlan) -> Tensor:
        ctx.plan = plan
        return x.index_select(0, plan.token_of_row)

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        # Each token's gradient is the sum over its k rows: a gather and a sum, not an index_add.
        return _sum_pairs(grad_rows.contiguous(), ctx.plan, None), None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: Tensor, plan: RoutingPlan, weights: Tensor) -> Tensor:
        ctx.plan = plan
        ctx.save_for_backward(rows, weights)
        return _sum_pairs(rows, plan, weights)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        rows, weights = ctx.saved_tensors
        plan = ctx.plan
        # Gather the output gradient to row order once; both gradients are read off it there.
        grad_rows = grad_out.contiguous().index_select(0, plan.token_of_row)  # [N, D]
        grad_weights = None
        if ctx.needs_input_grad[2]:
            # Row-wise dot products as a batch of 1 x D x 1 products: no [N, D] temporary.
            dots = torch.bmm(grad_rows.unsqueeze(1), rows.unsqueeze(2)).view(-1)
            grad_weights = dots.new_zeros(weights.numel()).index_copy_(0, plan.pair_of_row, dots)
            grad_weights = grad_weights.view_as(weights).to(weights.dtype)
        if not ctx.needs_input_grad[0]:
            return None, None, grad_weights
        row_weights = weights.reshape(-1).index_select(0, plan.pair_of_row).to(grad_rows.dtype)
        return grad_rows.mul_(row_weights.unsqueeze(1)), None, grad_weights


def permute(x: Tensor, plan: RoutingPlan) -> Tensor:
    """Token rows `x [T, D]` -> rows grouped by expert `[N, D]` (N = kept pairs)."""
    return _Permute.apply(x, plan)


def unpermute(rows: Tensor, plan: RoutingPlan, weights: Tensor | None = None) -> Tensor:
    """Expert outputs `[N, D]` -> tokens `[T, D]`: sum over the k choices, weighted by `weights [T, k]`."""
    if weights is None:
        weights = torch.ones(plan.row_of_pair.shape, dtype=rows.dtype, device=rows.device)
    return _Unpermute.apply(rows, plan, weights)
