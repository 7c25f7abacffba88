"""FP8 and MXFP4 checkpoint tensors read a block at a time equal transformers' own dequantization of the whole."""

import pytest
import torch
from quantize import quantize_fp8, quantize_mxfp4
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from moe_dist.hf.quantized import (
    Quantized, fp8_block_size, mxfp4_shape, quantized_tensors, read_fp8, read_mxfp4)


def memory_reader(tensors: dict[str, torch.Tensor], reads: list | None = None):
    """A reader over in-memory tensors that records (key, shape read) in `reads`."""
    def read(key: str, block: tuple[slice, ...]) -> torch.Tensor:
        assert all(s.step is None for s in block) and len(block) == tensors[key].dim()
        out = tensors[key][block].clone()
        if reads is not None:
            reads.append((key, tuple(out.shape)))
        return out
    return read


def grid(size: int, step: int) -> list[slice]:
    """`size` cut into slices of `step`, the last one short."""
    return [slice(start, min(start + step, size)) for start in range(0, size, step)]


FP8_BLOCKS = [(slice(0, 200), slice(0, 300)), (slice(0, 128), slice(128, 256)), (slice(5, 133), slice(17, 290)),
              (slice(199, 200), slice(0, 300)), (slice(128, 200), slice(256, 300)), (slice(64, 65), slice(127, 129))]


@pytest.mark.parametrize("block", FP8_BLOCKS)
def test_fp8_block_equals_transformers(block):
    weight, scales = quantize_fp8(torch.randn(200, 300) * 3, (128, 128))
    full = _dequantize_fp8_weight(weight, scales, [128, 128], torch.float32)
    reads = []
    out = read_fp8(memory_reader({"w.weight": weight, "w.weight_scale_inv": scales}, reads), "w.weight", block,
                   (128, 128))
    assert out.dtype == torch.float32 and torch.equal(out, full[block])
    rows, cols = block
    # Only the block and the scales covering it are read.
    assert reads[0] == ("w.weight", (rows.stop - rows.start, cols.stop - cols.start))
    assert reads[1] == ("w.weight_scale_inv", ((rows.stop - 1) // 128 - rows.start // 128 + 1,
                                               (cols.stop - 1) // 128 - cols.start // 128 + 1))


def test_fp8_small_blocks_every_read():
    """Scale blocks of [4, 8] under reads of 5 x 7 (and of 3 x 16): each crosses several scale blocks, unaligned."""
    weight, scales = quantize_fp8(torch.randn(37, 45), (4, 8))
    full = _dequantize_fp8_weight(weight, scales, [4, 8], torch.float32)
    read = memory_reader({"w.weight": weight, "w.weight_scale_inv": scales})
    for row_step, col_step in ((5, 7), (3, 16), (4, 8)):
        for rows in grid(37, row_step):
            for cols in grid(45, col_step):
                assert torch.equal(read_fp8(read, "w.weight", (rows, cols), (4, 8)), full[rows, cols])


def test_fp8_e8m0_scales_and_leading_dims():
    """Power-of-two scales stored as float8_e8m0fnu, and a fused [E, rows, cols] weight with [E, R, C] scales."""
    weight, scales = quantize_fp8(torch.randn(3, 20, 30), (8, 16))
    scales = torch.exp2(torch.ceil(torch.log2(scales))).to(torch.float8_e8m0fnu)
    full = _dequantize_fp8_weight(weight, scales, [8, 16], torch.float32)
    read = memory_reader({"w.weight": weight, "w.weight_scale_inv": scales})
    block = (slice(1, 3), slice(3, 19), slice(10, 30))
    assert torch.equal(read_fp8(read, "w.weight", block, (8, 16)), full[block])


E, COLS, ROWS = 3, 96, 20
MXFP4_BLOCKS = [(slice(0, E), slice(0, COLS), slice(0, ROWS)), (slice(1, 2), slice(32, 64), slice(0, ROWS)),
                (slice(0, E), slice(5, 70), slice(3, 17)), (slice(2, 3), slice(95, 96), slice(19, 20)),
                (slice(0, 2), slice(64, 96), slice(7, 8)), (slice(1, 3), slice(31, 33), slice(0, 5))]


@pytest.mark.parametrize("block", MXFP4_BLOCKS)
def test_mxfp4_block_equals_transformers(block):
    blocks, scales = quantize_mxfp4(torch.randn(E, COLS, ROWS) * 10)
    scales[0, 0, 0], scales[1, 2, 1] = 0, 140  # the extreme exponents: 2 ** -127 (subnormal) and 2 ** 13
    full = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert list(full.shape) == mxfp4_shape(list(blocks.shape)) == [E, COLS, ROWS]
    reads = []
    out = read_mxfp4(memory_reader({"p_blocks": blocks, "p_scales": scales}, reads), "p", block)
    assert out.dtype == torch.float32 and torch.equal(out, full[block])
    experts, cols, rows = block
    groups = (cols.stop - 1) // 32 - cols.start // 32 + 1
    shape = (experts.stop - experts.start, rows.stop - rows.start, groups)
    assert reads == [("p_blocks", (*shape, 16)), ("p_scales", shape)]


def test_round_trip_error_small():
    w = torch.randn(200, 300)
    weight, scales = quantize_fp8(w, (128, 128))
    out = read_fp8(memory_reader({"w.weight": weight, "w.weight_scale_inv": scales}), "w.weight",
                   (slice(0, 200), slice(0, 300)), (128, 128))
    assert (out - w).norm() / w.norm() < 0.04  # e4m3 keeps 3 mantissa bits: about 0.026
    w = torch.randn(E, COLS, ROWS)
    blocks, scales = quantize_mxfp4(w)
    out = read_mxfp4(memory_reader({"p_blocks": blocks, "p_scales": scales}), "p",
                     (slice(0, E), slice(0, COLS), slice(0, ROWS)))
    assert (out - w).norm() / w.norm() < 0.15  # e2m1 keeps 1: about 0.115
    # Values e2m1 holds exactly, times a power of two per group, come back exactly.
    exact = torch.tensor([[0.5], [-1.5], [3.0], [-6.0]]).repeat(E, COLS // 4, ROWS) * 2.0 ** -3
    blocks, scales = quantize_mxfp4(exact)
    assert torch.equal(read_mxfp4(memory_reader({"p_blocks": blocks, "p_scales": scales}), "p",
                                  (slice(0, E), slice(0, COLS), slice(0, ROWS))), exact)


def test_safetensors_slices(tmp_path):
    """Through safe_open's get_slice, as the import reads: F8_E4M3 weights, F32 scales, U8 blocks and scales."""
    weight, fp8_scales = quantize_fp8(torch.randn(200, 300), (128, 128))
    blocks, mx_scales = quantize_mxfp4(torch.randn(E, COLS, ROWS))
    path = tmp_path / "model.safetensors"
    save_file({"a.weight": weight, "a.weight_scale_inv": fp8_scales, "m.experts.down_proj_blocks": blocks,
               "m.experts.down_proj_scales": mx_scales, "norm.weight": torch.ones(4)}, str(path))
    with safe_open(str(path), framework="pt") as f:
        assert [f.get_slice(key).get_dtype() for key in ("a.weight", "a.weight_scale_inv",
                                                         "m.experts.down_proj_blocks")] == ["F8_E4M3", "F32", "U8"]
        read = lambda key, block: f.get_slice(key)[block]  # noqa: E731
        fp8_full = _dequantize_fp8_weight(weight, fp8_scales, [128, 128], torch.float32)
        for block in FP8_BLOCKS:
            assert torch.equal(read_fp8(read, "a.weight", block, (128, 128)), fp8_full[block])
        mx_full = convert_moe_packed_tensors(blocks, mx_scales, dtype=torch.float32)
        for block in MXFP4_BLOCKS:
            assert torch.equal(read_mxfp4(read, "m.experts.down_proj", block), mx_full[block])
        assert quantized_tensors(f.keys()) == {
            "a.weight": Quantized("a.weight", "fp8", "a.weight", "a.weight_scale_inv"),
            "m.experts.down_proj": Quantized("m.experts.down_proj", "mxfp4", "m.experts.down_proj_blocks",
                                             "m.experts.down_proj_scales")}


def test_half_pairs_are_not_quantized():
    assert quantized_tensors(["a.weight_scale_inv", "b_blocks", "c_scales", "d.weight", "e.bias_scale_inv",
                              "e.bias"]) == {}


def test_fp8_block_size():
    assert fp8_block_size({"quant_method": "fp8"}) == (128, 128)
    assert fp8_block_size({"weight_block_size": [64, 32]}) == (64, 32)
    for bad in (None, [128], [128, 0], [128.0, 128], "128"):
        with pytest.raises(ValueError, match="weight_block_size"):
            fp8_block_size({"weight_block_size": bad})
