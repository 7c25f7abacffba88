"""Multi-head latent attention (DeepSeek-V3): keys and values from one shared low-rank latent."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_dist.config import ModelConfig
from moe_dist.model.masks import AttentionMask, attend
from moe_dist.model.rotary import apply_rotary, yarn_mscale

# DeepSeek-V3's latent norms are built without its rms_norm_eps (DeepseekV3RMSNorm(rank) keeps the class default),
# so the checkpoints were trained with 1e-6 there whatever the config says.
LATENT_NORM_EPS = 1e-6


class MLA(nn.Module):
    """q through a q_lora_rank bottleneck (or one projection); keys and values expanded per head from a kv_lora_rank
    latent; heads of qk_nope_head_dim + qk_rope_head_dim for q and k, rotary on the second part only, with one
    rotary key shared by every head; v_head_dim for v."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.rope_interleave = cfg.rope_interleave
        qk_head_dim = self.nope_dim + self.rope_dim
        self.q_lora = cfg.q_lora_rank > 0
        if self.q_lora:
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_a_norm = nn.RMSNorm(cfg.q_lora_rank, eps=LATENT_NORM_EPS)
            self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.n_heads * qk_head_dim, bias=False)
        else:
            self.wq = nn.Linear(cfg.dim, cfg.n_heads * qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, cfg.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_norm = nn.RMSNorm(cfg.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, cfg.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.v_dim, cfg.dim, bias=cfg.out_bias)
        self.scale = qk_head_dim ** -0.5
        if cfg.rope_scaling != "none" and cfg.rope_mscale_all_dim:  # the part of YaRN's correction left to the softmax
            mscale = yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim)
            self.scale = self.scale * mscale * mscale

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask, window: int = 0,
                kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """As Attention.forward; the cache holds the expanded keys [B, H, S, nope + rope] and values [B, H, S, v]."""
        batch, seq_len, _ = x.shape
        q = self.wq_b(self.q_a_norm(self.wq_a(x))) if self.q_lora else self.wq(x)
        q = q.view(batch, seq_len, self.n_heads, -1).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv_heads = self.wkv_b(self.kv_a_norm(latent)).view(batch, seq_len, self.n_heads, -1).transpose(1, 2)
        k_nope, v = kv_heads.split([self.nope_dim, self.v_dim], dim=-1)
        q_rope = apply_rotary(q_rope, cos, sin, self.rope_interleave)
        k_rope = apply_rotary(k_rope.unsqueeze(1), cos, sin, self.rope_interleave)  # [B, 1, S, rope]: one for all heads
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, self.n_heads, -1, -1)], dim=-1)
        if kv is not None:
            end = mask.start_pos + seq_len
            kv[0][:, :, mask.start_pos:end] = k
            kv[1][:, :, mask.start_pos:end] = v
            k, v = kv[0][:, :, :end], kv[1][:, :, :end]
        out = attend(q, k, v, mask, window, scale=self.scale)
        return self.wo(out.transpose(1, 2).reshape(batch, seq_len, -1))
