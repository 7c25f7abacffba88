"""The experts' gated activations act(h1, h3), h1 = x w1 (+ b1) and h3 = x w3 (+ b3): the forward, and the
derivatives that the fused grouped backward (kernels/grouped_mm.py) computes by hand."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("swiglu", "clamped_swiglu")


@dataclass(frozen=True)
class GatedActivation:
    """swiglu: silu(h1) * h3. clamped_swiglu (gpt-oss): g = min(h1, limit), u = clamp(h3, -limit, limit),
    g * sigmoid(alpha * g) * (u + 1)."""

    kind: str = "swiglu"
    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown activation {self.kind!r} (valid: {', '.join(KINDS)})")

    def __call__(self, h1: Tensor, h3: Tensor) -> Tensor:
        """act(h1, h3), differentiable by autograd."""
        if self.kind == "swiglu":
            return F.silu(h1) * h3
        gate = h1.clamp(max=self.limit)
        return (h3.clamp(-self.limit, self.limit) + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def apply_(self, h1: Tensor, h3: Tensor) -> Tensor:
        """act(h1, h3) bit for bit, without autograd: in place on its own temporaries (one buffer fewer)."""
        if self.kind == "swiglu":
            return F.silu(h1).mul_(h3)
        gate = h1.clamp(max=self.limit)
        return h3.clamp(-self.limit, self.limit).add_(1).mul_(gate.mul_(torch.sigmoid(gate * self.alpha)))

    def derivatives(self, h1: Tensor, h3: Tensor, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(act, d loss / d h1, d loss / d h3) for `grad` = d loss / d act, in the inputs' dtype (the caller
        passes fp32 for half types, as autograd's own kernels compute)."""
        if self.kind == "swiglu":
            gate = torch.sigmoid(h1)
            silu = h1 * gate
            act = silu * h3
            # d silu(h) / dh = gate * (1 + h * (1 - gate))
            grad_h1 = (1 - gate).mul_(h1).add_(1).mul_(gate).mul_(h3).mul_(grad)
            return act, grad_h1, silu.mul_(grad)
        gate = h1.clamp(max=self.limit)
        up_plus_1 = h3.clamp(-self.limit, self.limit).add_(1)
        sig = torch.sigmoid(gate * self.alpha)
        glu = gate * sig
        act = up_plus_1 * glu
        # d (g sigmoid(a g)) / dg = s (1 + a g (1 - s)); a clamp passes the gradient where its input is within
        # its bounds (bounds included, as torch.clamp's backward).
        grad_h1 = (1 - sig).mul_(gate).mul_(self.alpha).add_(1).mul_(sig).mul_(up_plus_1).mul_(grad)
        grad_h1.masked_fill_(h1 > self.limit, 0)
        grad_h3 = glu.mul_(grad).masked_fill_(h3.abs() > self.limit, 0)
        return act, grad_h1, grad_h3


SWIGLU = GatedActivation()
