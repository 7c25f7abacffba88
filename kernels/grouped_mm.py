"""Expert GEMMs over variable-size groups of rows, with the fastest backend that works.

Rows arrive grouped by expert (`counts[e]` consecutive rows for expert e). Backends:
- grouped_mm: `torch._grouped_mm`, one kernel for all groups (CUDA sm90+, and CPU fp32/bf16).
- padded: scatter the groups into an [E, max_count, D] buffer and use one `bmm` per projection.
- loop: one matmul per expert; the reference and a fallback, never chosen by "auto".
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("grouped_mm", "padded", "loop")


@functools.cache
def _grouped_mm_runs(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs forward and backward for this device and dtype."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = torch.randn(16, 16, device=device_type, dtype=dtype, requires_grad=True)
        w = torch.randn(2, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
        offsets = torch.tensor([8, 16], device=device_type, dtype=torch.int32)
        _GroupedMM.apply(x, w, offsets).float().square().sum().backward()
        return True
    except (RuntimeError, NotImplementedError):
        return False


def _aligned(*tensors: Tensor) -> bool:
    # torch._grouped_mm wants every row stride to be a multiple of 16 bytes.
    return all(t.shape[-1] * t.element_size() % 16 == 0 for t in tensors)


def select_backend(x: Tensor, *weights: Tensor) -> str:
    """The fastest backend that works for these operands (see benchmarks/RESULTS.md)."""
    if _aligned(x, *weights) and _grouped_mm_runs(x.device.type, x.dtype):
        return "grouped_mm"
    return "padded"


class _GroupedMM(torch.autograd.Function):
    """torch._grouped_mm with an explicit backward (its own needs contiguous gradients)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
        ctx.save_for_backward(x, w, offsets)
        return torch._grouped_mm(x, w, offs=offsets)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, w, offsets = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch._grouped_mm(grad_out, w.transpose(-2, -1), offs=offsets)
        if ctx.needs_input_grad[1]:
            grad_w = torch._grouped_mm(x.t(), grad_out, offs=offsets)
        return grad_x, grad_w, None


class PaddedGroups:
    """Index maps between grouped rows [N, D] and a zero-padded [E, capacity, D] layout."""

    def __init__(self, counts: Tensor, num_rows: int):
        self.num_groups = counts.numel()
        self.capacity = int(counts.max())  # one host sync per call
        starts = torch.cumsum(counts, 0) - counts
        group = torch.repeat_interleave(torch.arange(self.num_groups, device=counts.device), counts,
                                        output_size=num_rows)
        position = torch.arange(num_rows, device=counts.device) - starts[group]
        self.index = group * self.capacity + position

    def pad(self, rows: Tensor) -> Tensor:
        padded = rows.new_zeros(self.num_groups * self.capacity, rows.shape[1])
        return padded.index_copy(0, self.index, rows).view(self.num_groups, self.capacity, -1)

    def unpad(self, padded: Tensor) -> Tensor:
        return padded.reshape(self.num_groups * self.capacity, -1).index_select(0, self.index)


def _loop(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    groups = x.split(counts.tolist())
    return torch.cat([g @ w_e for g, w_e in zip(groups, w.unbind(0))])


# Variable-size groups run eagerly under torch.compile: the padded path syncs with the host, and
# dynamo's shape rules for torch._grouped_mm accept only bf16 while the CPU kernel also takes fp32.
@torch.compiler.disable
def grouped_mm(x: Tensor, w: Tensor, counts: Tensor, backend: str = "auto") -> Tensor:
    """`x [N, K]` grouped by `counts [E]`, `w [E, K, M]` -> `[N, M]`: group e times w[e]."""
    if backend == "auto":
        backend = select_backend(x, w)
    if backend == "grouped_mm":
        return _GroupedMM.apply(x, w, torch.cumsum(counts, 0).to(torch.int32))
    if backend == "padded":
        groups = PaddedGroups(counts, x.shape[0])
        return groups.unpad(torch.bmm(groups.pad(x), w))
    if backend == "loop":
        return _loop(x, w, counts)
    raise ValueError(f"grouped_mm: unknown backend {backend!r} (valid: auto, {', '.join(BACKENDS)})")


@torch.compiler.disable
def grouped_swiglu(x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, counts: Tensor, backend: str = "auto") -> Tensor:
    """SwiGLU experts on grouped rows: `(silu(x w1[e]) * (x w3[e])) w2[e]` for each group e."""
    if backend == "auto":
        backend = select_backend(x, w1, w2)
    if backend == "padded":  # pad once for all three projections
        groups = PaddedGroups(counts, x.shape[0])
        padded = groups.pad(x)
        hidden = F.silu(torch.bmm(padded, w1)) * torch.bmm(padded, w3)
        return groups.unpad(torch.bmm(hidden, w2))
    hidden = F.silu(grouped_mm(x, w1, counts, backend)) * grouped_mm(x, w3, counts, backend)
    return grouped_mm(hidden, w2, counts, backend)
