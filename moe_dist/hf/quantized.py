"""Quantized checkpoint tensors, dequantized a block at a time: FP8 with per-block scales (DeepSeek-V3, Kimi K2)
and MXFP4 experts (gpt-oss).

Like a plain import, a block reads only the stored bytes and scales that cover it, never the whole tensor. Values
equal transformers' own dequantization to the bit (both multiply the fp32 value by the fp32 scale once):
finegrained_fp8._dequantize_fp8_weight and mxfp4.convert_moe_packed_tensors, at dtype float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

# read(key, block): only `block` (slices with step 1, one per dim) of tensor `key`, read from the checkpoint.
Reader = Callable[[str, tuple[slice, ...]], Tensor]

FP8_SCALE_SUFFIX = "_scale_inv"
MXFP4_BLOCKS_SUFFIX, MXFP4_SCALES_SUFFIX = "_blocks", "_scales"
DEFAULT_FP8_BLOCK = (128, 128)  # what transformers assumes when quantization_config names none
MXFP4_GROUP = 32  # values sharing one scale: 16 bytes of two e2m1 values each
MXFP4_EXPONENT_BIAS = 127
# The 16 e2m1 values by code: sign bit 3, then 2 exponent bits and 1 mantissa bit (transformers' FP4_VALUES).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(frozen=True)
class Quantized:
    """A tensor a checkpoint stores quantized: `name` (what it stands for), as `data` plus `scales`."""

    name: str
    format: str  # "fp8" or "mxfp4"
    data: str
    scales: str


def quantized_tensors(keys: Iterable[str]) -> dict[str, Quantized]:
    """The quantized tensors among a checkpoint's keys, by the name each stands for: x.weight + x.weight_scale_inv
    stands for x.weight (FP8), p_blocks + p_scales for p (MXFP4). Half a pair is not listed (an import that finds
    it left over reports it as the unexpected tensor it is)."""
    keys = set(keys)
    out = {}
    for key in sorted(keys):
        if key.endswith(".weight" + FP8_SCALE_SUFFIX) and key.removesuffix(FP8_SCALE_SUFFIX) in keys:
            name = key.removesuffix(FP8_SCALE_SUFFIX)
            out[name] = Quantized(name, "fp8", name, key)
        elif key.endswith(MXFP4_BLOCKS_SUFFIX):
            name = key.removesuffix(MXFP4_BLOCKS_SUFFIX)
            if name + MXFP4_SCALES_SUFFIX in keys:
                out[name] = Quantized(name, "mxfp4", key, name + MXFP4_SCALES_SUFFIX)
    return out


def fp8_block_size(quantization_config: dict) -> tuple[int, int]:
    """The FP8 scale block [rows, cols] that config.json's quantization_config names; ValueError for one that is
    not two positive ints (null means one scale per tensor, which read_fp8 does not read)."""
    block = quantization_config.get("weight_block_size", list(DEFAULT_FP8_BLOCK))
    if not (isinstance(block, list) and len(block) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in block)):
        raise ValueError(f"quantization_config.weight_block_size = {block!r}: expected two positive ints")
    return block[0], block[1]


def _covering(span: slice, size: int) -> slice:
    """The blocks of `size` elements that cover `span`."""
    return slice(span.start // size, -(-span.stop // size))


def read_fp8(read: Reader, key: str, block: tuple[slice, ...], block_size: tuple[int, int]) -> Tensor:
    """fp32 values of `block` of FP8 weight `key` ([..., rows, cols]) once dequantized with its scales
    (key + "_scale_inv", [..., ceil(rows / block rows), ceil(cols / block cols)], float32 or e8m0), reading only
    the weight's block and the scales that cover it. The block need not align to the scale blocks."""
    *lead, rows, cols = block
    scale_rows, scale_cols = _covering(rows, block_size[0]), _covering(cols, block_size[1])
    weight = read(key, block).to(torch.float32)
    scales = read(key + FP8_SCALE_SUFFIX, (*lead, scale_rows, scale_cols)).to(torch.float32)
    # Expanding the scales over rows only, then scaling one column block at a time, keeps the extra memory at one
    # scale per row and column block instead of a second block-sized tensor.
    row_blocks = torch.arange(rows.start, rows.stop) // block_size[0] - scale_rows.start
    scales = scales[..., row_blocks, :]
    for j in range(scale_cols.stop - scale_cols.start):
        first = max(cols.start, (scale_cols.start + j) * block_size[1]) - cols.start
        last = min(cols.stop, (scale_cols.start + j + 1) * block_size[1]) - cols.start
        weight[..., first:last].mul_(scales[..., j:j + 1])
    return weight


def mxfp4_shape(blocks_shape: list[int]) -> list[int]:
    """Shape [E, cols, rows] of the dequantized tensor whose `_blocks` have shape [E, rows, G, bytes per group]."""
    experts, rows, groups, group_bytes = blocks_shape
    return [experts, groups * group_bytes * 2, rows]


def read_mxfp4(read: Reader, prefix: str, block: tuple[slice, slice, slice]) -> Tensor:
    """fp32 values of `block` of MXFP4 tensor `prefix` once dequantized, in transformers' transposed [E, cols, rows]
    layout, reading only the experts and rows of the block and the groups of 32 that cover its cols from
    prefix + "_blocks" ([E, rows, G, 16] uint8) and prefix + "_scales" ([E, rows, G] uint8). A transposed view."""
    experts, cols, rows = block
    groups = _covering(cols, MXFP4_GROUP)
    packed = read(prefix + MXFP4_BLOCKS_SUFFIX, (experts, rows, groups, slice(0, MXFP4_GROUP // 2)))
    exponents = read(prefix + MXFP4_SCALES_SUFFIX, (experts, rows, groups)).to(torch.int32) - MXFP4_EXPONENT_BIAS
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).to(torch.int64)  # low nibble holds the earlier value
    values = torch.tensor(E2M1_VALUES, dtype=torch.float32)[codes].flatten(-2)  # [e, r, g, 32]
    # ldexp as transformers calls it (x * 2.0 ** exponent in fp32): exponent 128 (scale byte 255) gives inf as there.
    values = torch.ldexp(values, exponents.unsqueeze(-1)).flatten(-2)
    offset = groups.start * MXFP4_GROUP
    return values[..., cols.start - offset:cols.stop - offset].transpose(1, 2)
