"""The seed's MoE design: a Python loop over experts with boolean masks.

Kept as the numerical reference for the tests and the baseline for the routing benchmark.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def moe_loop(x: Tensor, expert_ids: Tensor, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor,
             keep: Tensor | None = None) -> Tensor:
    """out[t] = sum_j weights[t, j] * SwiGLU_{expert_ids[t, j]}(x[t]) over the kept pairs."""
    out = torch.zeros_like(x)
    # One unbind per weight, not w[e] per expert: the backward of w[e] fills a full [E, ...]
    # gradient for every expert, which makes the baseline quadratic in E and not worth beating.
    for e, (w1_e, w3_e, w2_e) in enumerate(zip(w1.unbind(0), w3.unbind(0), w2.unbind(0))):
        mask = expert_ids == e
        if keep is not None:
            mask &= keep
        token, choice = mask.nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        h = x[token]
        y = (F.silu(h @ w1_e) * (h @ w3_e)) @ w2_e
        out.index_add_(0, token, y * weights[token, choice].unsqueeze(-1).to(y.dtype))
    return out
