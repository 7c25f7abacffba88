"""Quantizers for tests: float tensors as the FP8 and MXFP4 checkpoints of DeepSeek-V3 and gpt-oss store them."""

from __future__ import annotations

import torch
from torch import Tensor

from moe_dist.hf.quantized import E2M1_VALUES, MXFP4_EXPONENT_BIAS, MXFP4_GROUP

FP8_MAX = 448.0  # the largest float8_e4m3fn value
E2M1_MAX = 6.0


def quantize_fp8(w: Tensor, block_size: tuple[int, int] = (128, 128)) -> tuple[Tensor, Tensor]:
    """(float8_e4m3fn weight, float32 scale_inv [..., ceil(rows / block rows), ceil(cols / block cols)]) of `w`
    ([..., rows, cols]): each block divided by its amax / 448."""
    rows, cols = w.shape[-2:]
    pad_rows, pad_cols = -rows % block_size[0], -cols % block_size[1]
    padded = torch.nn.functional.pad(w.float(), (0, pad_cols, 0, pad_rows))  # zeros leave each amax as it is
    tiles = padded.unflatten(-1, (-1, block_size[1])).unflatten(-3, (-1, block_size[0]))  # [..., R, br, C, bc]
    # An all-zero block would divide by 0: any positive scale quantizes it to zeros.
    scales = (tiles.abs().amax(dim=(-3, -1)) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    expanded = scales.repeat_interleave(block_size[0], -2).repeat_interleave(block_size[1], -1)[..., :rows, :cols]
    return (w.float() / expanded).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scales


def quantize_mxfp4(w_ECR: Tensor) -> tuple[Tensor, Tensor]:
    """(blocks [E, rows, G, 16] uint8, scales [E, rows, G] uint8) of `w_ECR` ([E, cols, rows], cols a multiple of
    32): each group of 32 along cols divided by the power of two that brings its amax to at most 6, then each value
    rounded to the nearest e2m1 value, two to a byte (the earlier in the low nibble)."""
    experts, cols, rows = w_ECR.shape
    groups = w_ECR.float().transpose(1, 2).unflatten(-1, (cols // MXFP4_GROUP, MXFP4_GROUP))  # [E, rows, G, 32]
    amax = groups.abs().amax(dim=-1)
    exponents = torch.ceil(torch.log2(amax / E2M1_MAX)).clamp(-MXFP4_EXPONENT_BIAS, MXFP4_EXPONENT_BIAS).int()
    scaled = torch.ldexp(groups, -exponents.unsqueeze(-1))
    codes = (scaled.unsqueeze(-1) - torch.tensor(E2M1_VALUES)).abs().argmin(dim=-1).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exponents + MXFP4_EXPONENT_BIAS).to(torch.uint8)
