"""Top-k router: expert choice, combine weights, load-balancing and z losses, optional capacity."""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable

import torch
from torch import Tensor, nn

from kernels.routing import capacity_keep
from moe_dist.config import MoEConfig


@dataclass
class RouterOutput:
    expert_ids: Tensor  # [T, k] int64
    weights: Tensor  # [T, k] combine weights
    keep: Tensor | None  # [T, k] bool, False where capacity dropped the pair; None when dropless
    aux_loss: Tensor  # scalar: the coefficients times the load-balancing, sequence-level and z losses
    load_balance_loss: Tensor  # scalar, uncoefficiented, for metrics
    z_loss: Tensor  # scalar, uncoefficiented, for metrics
    counts: Tensor  # [E] float, pairs routed to each expert over the whole (reduced) batch


class Router(nn.Module):
    """Scores tokens against experts and picks the top k.

    Capacity is counted per sequence so that which pairs are dropped does not depend on how the
    batch is split across ranks. `all_reduce_stats` sums the load-balancing statistics over the
    ranks that share the batch; the parallel module sets it, the default is one process.
    """

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.score_func = cfg.score_func
        self.renormalize = cfg.renormalize
        self.aux_loss_coef = cfg.aux_loss_coef
        self.z_loss_coef = cfg.z_loss_coef
        self.aux_free_bias = cfg.aux_free_bias
        self.bias_update_rate = cfg.bias_update_rate
        self.capacity_factor = cfg.capacity_factor
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.seq_aux_loss_coef = cfg.seq_aux_loss_coef
        # With router_bias, softmax + renormalize over the top k is gpt-oss's softmax of the top-k biased logits.
        self.gate = nn.Linear(dim, cfg.num_experts, bias=cfg.router_bias)
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))  # selection only, never a weight
        self.all_reduce_stats: Callable[[Tensor], Tensor] = lambda stats: stats

    def capacity(self, seq_len: int) -> int:
        return max(1, math.ceil(self.capacity_factor * seq_len * self.top_k / self.num_experts))

    def forward(self, x: Tensor, seq_len: int) -> RouterOutput:
        """x [T, D], T = batch * seq_len tokens."""
        logits = self.gate(x).float()
        scores = logits.softmax(-1) if self.score_func == "softmax" else logits.sigmoid()
        selection = scores + self.expert_bias if self.aux_free_bias else scores
        if self.topk_group < self.n_group:
            selection = self.limit_to_groups(selection)
        expert_ids = selection.topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, expert_ids)
        if self.renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
        keep = None
        if self.capacity_factor > 0:
            keep = capacity_keep(expert_ids, seq_len, self.num_experts, self.capacity(seq_len))

        # One reduction for everything the losses need:
        # [counts | score sums | logsumexp^2 sum | per-sequence balance losses' sum | tokens].
        probs = scores if self.score_func == "softmax" else scores / scores.sum(-1, keepdim=True)
        counts = torch.zeros(self.num_experts, device=x.device).scatter_add_(
            0, expert_ids.reshape(-1), torch.ones(expert_ids.numel(), device=x.device))
        num_tokens = torch.full((1,), float(x.shape[0]), device=x.device)
        z_sum = torch.logsumexp(logits, -1).square().sum().unsqueeze(0)
        seq_sum = self.sequence_balance_losses(expert_ids, probs, seq_len).sum().unsqueeze(0)
        stats = self.all_reduce_stats(torch.cat([counts, probs.sum(0), z_sum, seq_sum, num_tokens]))
        counts, prob_sum = stats[: self.num_experts].detach(), stats[self.num_experts: 2 * self.num_experts]
        z_sum, seq_sum, num_tokens = stats[-3], stats[-2], stats[-1].detach()
        fraction_routed = counts / (num_tokens * self.top_k)
        load_balance_loss = self.num_experts * (fraction_routed * prob_sum / num_tokens).sum()
        z_loss = z_sum / num_tokens
        seq_loss = seq_sum / (num_tokens / seq_len)  # every sequence has seq_len tokens
        aux_loss = (self.aux_loss_coef * load_balance_loss + self.z_loss_coef * z_loss
                    + self.seq_aux_loss_coef * seq_loss)
        return RouterOutput(expert_ids, weights, keep, aux_loss, load_balance_loss.detach(), z_loss.detach(), counts)

    def limit_to_groups(self, selection: Tensor) -> Tensor:
        """DeepSeek-V3's group-limited routing: each group of experts is scored by the sum of its two best
        selection scores, and a token may choose only among the experts of its topk_group best groups."""
        grouped_TGX = selection.view(selection.shape[0], self.n_group, -1)
        group_scores_TG = grouped_TGX.topk(min(2, grouped_TGX.shape[-1]), dim=-1).values.sum(-1)
        best_groups = group_scores_TG.topk(self.topk_group, dim=-1).indices
        allowed_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, best_groups, True)
        return grouped_TGX.masked_fill(~allowed_TG.unsqueeze(-1), float("-inf")).view_as(selection)

    def sequence_balance_losses(self, expert_ids: Tensor, probs: Tensor, seq_len: int) -> Tensor:
        """[B] the load-balancing loss of each sequence on its own (DeepSeek-V3's sequence-wise balance loss);
        empty when its coefficient is 0."""
        if self.seq_aux_loss_coef == 0:
            return probs.new_zeros(0)
        sequences = expert_ids.shape[0] // seq_len
        counts_BE = torch.zeros(sequences, self.num_experts, device=probs.device).scatter_add_(
            1, expert_ids.view(sequences, -1), torch.ones(sequences, seq_len * self.top_k, device=probs.device))
        fraction_BE = counts_BE / (seq_len * self.top_k)
        prob_mean_BE = probs.view(sequences, seq_len, -1).mean(1)
        return self.num_experts * (fraction_BE * prob_mean_BE).sum(-1)

    @torch.no_grad()
    def update_expert_bias(self, counts: Tensor) -> None:
        """Auxiliary-loss-free balancing: nudge the selection bias of over-loaded experts down."""
        if self.aux_free_bias and counts.sum() > 0:
            self.expert_bias += self.bias_update_rate * torch.sign(counts.mean() - counts)
