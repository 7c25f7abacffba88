"""Rotary position embeddings: the tables (default, linear, llama3 or yarn scaled) and their application to a head's
first rot_dim dims, in halves or in adjacent pairs."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moe_dist.config import ModelConfig


def rotary_dim(cfg: ModelConfig) -> int:
    """How many dims of each q and k head rotate: qk_rope_head_dim under MLA, else rotary_dim (0 = the whole head)."""
    if cfg.attention == "mla":
        return cfg.qk_rope_head_dim
    return cfg.rotary_dim or cfg.head_size


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context `factor` times the original."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _llama3(inv_freq: Tensor, cfg: ModelConfig) -> Tensor:
    """Llama 3.1: long wavelengths divided by the factor, short ones kept, a smooth ramp between them."""
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_context = cfg.rope_original_max_seq_len
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(rot_dim: int, cfg: ModelConfig, device=None) -> tuple[Tensor, float]:
    """YaRN: each frequency between extrapolated (kept) and interpolated (divided by the factor) along a ramp over
    the dims whose wavelengths fit beta_fast ... beta_slow times in the original context; -> (inv_freq, the factor
    cos and sin are scaled by)."""
    base, factor = cfg.rope_theta, cfg.rope_factor
    if cfg.rope_attention_factor > 0:
        attention_factor = cfg.rope_attention_factor
    elif cfg.rope_mscale and cfg.rope_mscale_all_dim:  # DeepSeek: the rest of the correction is in the softmax scale
        attention_factor = yarn_mscale(factor, cfg.rope_mscale) / yarn_mscale(factor, cfg.rope_mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        """The dim whose wavelength fits `rotations` times in the original context."""
        return rot_dim * math.log(cfg.rope_original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot_dim - 1)
    if low == high:
        high += 0.001  # the ramp needs a width
    ramp = ((torch.arange(rot_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    extrapolation_weight = 1 - ramp  # and below 1 - it rather than the ramp: transformers' float32 steps, bit for bit
    pos_freqs = base ** (torch.arange(0, rot_dim, 2, device=device, dtype=torch.float32) / rot_dim)
    inv_freq = 1.0 / (factor * pos_freqs) * (1 - extrapolation_weight) + 1.0 / pos_freqs * extrapolation_weight
    return inv_freq, attention_factor


def inverse_frequencies(cfg: ModelConfig, device=None) -> tuple[Tensor, float]:
    """-> (inv_freq [rot_dim / 2], the factor cos and sin are scaled by), as transformers' ROPE_INIT_FUNCTIONS."""
    rot_dim = rotary_dim(cfg)
    if cfg.rope_scaling == "yarn":
        return _yarn(rot_dim, cfg, device)
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, rot_dim, 2, device=device, dtype=torch.float32) / rot_dim)
    if cfg.rope_scaling == "linear":
        return inv_freq / cfg.rope_factor, 1.0
    if cfg.rope_scaling == "llama3":
        return _llama3(inv_freq, cfg), 1.0
    return inv_freq, 1.0


def rotary_tables(cfg: ModelConfig, device=None) -> tuple[Tensor, Tensor]:
    """cos and sin [max_seq_len, rot_dim] in the half-split layout (as Llama/Mixtral in HF)."""
    inv_freq, attention_factor = inverse_frequencies(cfg, device)
    angles = torch.outer(torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, interleave: bool = False) -> Tensor:
    """x [B, H, S, hd]; cos, sin [S, rot_dim], or [B, 1, S, rot_dim] for positions of each sequence's own. Rotates
    the first rot_dim dims of each head and passes the rest through. With `interleave` the rotating dims come in
    adjacent pairs (DeepSeek): they leave de-interleaved, the pairs' first halves then their second halves."""
    rot_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    if interleave:
        x_rot = torch.cat([x_rot[..., 0::2], x_rot[..., 1::2]], dim=-1)
    half = rot_dim // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    out = (x_rot.float() * cos + rotated.float() * sin).to(x.dtype)
    return out if x_pass.shape[-1] == 0 else torch.cat([out, x_pass], dim=-1)
