"""The seed's MoE design: a Python loop over experts with boolean masks.

Kept as the numerical reference for the tests and the baseline for the routing benchmark.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.activation import SWIGLU, GatedActivation


def gated(h1: Tensor, h3: Tensor, act: GatedActivation) -> Tensor:
    """The activation written out plainly, apart from the kernels' own (clamped_swiglu as gpt-oss's _apply_gate)."""
    if act.kind == "swiglu":
        return F.silu(h1) * h3
    gate, up = h1.clamp(max=act.limit), h3.clamp(min=-act.limit, max=act.limit)
    return (up + 1) * (gate * torch.sigmoid(gate * act.alpha))


def affine(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return h @ w if b is None else h @ w + b


def moe_loop(x: Tensor, expert_ids: Tensor, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor,
             keep: Tensor | None = None, biases: tuple[Tensor, Tensor, Tensor] | None = None,
             act: GatedActivation = SWIGLU) -> Tensor:
    """out[t] = sum_j weights[t, j] * expert_{expert_ids[t, j]}(x[t]) over the kept pairs, where
    expert_e(h) = act(h w1[e] + b1[e], h w3[e] + b3[e]) w2[e] + b2[e] (no b without `biases`)."""
    out = torch.zeros_like(x)
    # One unbind per weight, not w[e] per expert: the backward of w[e] fills a full [E, ...]
    # gradient for every expert, which makes the baseline quadratic in E and not worth beating.
    b1, b3, b2 = (b.unbind(0) for b in biases) if biases is not None else ((None,) * w1.shape[0],) * 3
    for e, (w1_e, w3_e, w2_e) in enumerate(zip(w1.unbind(0), w3.unbind(0), w2.unbind(0))):
        mask = expert_ids == e
        if keep is not None:
            mask &= keep
        token, choice = mask.nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        h = x[token]
        y = affine(gated(affine(h, w1_e, b1[e]), affine(h, w3_e, b3[e]), act), w2_e, b2[e])
        out.index_add_(0, token, y * weights[token, choice].unsqueeze(-1).to(y.dtype))
    return out
