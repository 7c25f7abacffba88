"""Causal grouped-query attention with the options of the open MoE families."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_dist.config import ModelConfig
from moe_dist.model.masks import AttentionMask, attend
from moe_dist.model.rotary import apply_rotary


class Attention(nn.Module):
    """Grouped-query attention: biases on q, k, v (and on the output); RMSNorm on q and k per head or over the whole
    projection; clamping q, k, v; rotary on part of each head; attention sinks; a sliding window given per call."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_size
        self.qk_norm = cfg.qk_norm
        self.clip_qkv = cfg.clip_qkv
        self.rope_interleave = cfg.rope_interleave
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=cfg.out_bias)
        if cfg.qk_norm != "none":
            per_head = cfg.qk_norm == "head"
            self.q_norm = nn.RMSNorm(self.head_dim if per_head else self.wq.out_features, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim if per_head else self.wk.out_features, eps=cfg.norm_eps)
        self.sinks = nn.Parameter(torch.zeros(cfg.n_heads)) if cfg.attention_sinks else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask, window: int = 0,
                kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x holds positions mask.start_pos...; kv, this layer's (keys, values) cache, receives them; `window` > 0:
        each query sees only its last `window` keys."""
        batch, seq_len, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(batch, seq_len, self.n_heads, self.head_dim)
        k = k.view(batch, seq_len, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = (apply_rotary(t, cos, sin, self.rope_interleave) for t in (q, k))
        if kv is not None:
            end = mask.start_pos + seq_len
            kv[0][:, :, mask.start_pos:end] = k
            kv[1][:, :, mask.start_pos:end] = v
            k, v = kv[0][:, :, :end], kv[1][:, :, :end]
        out = attend(q, k, v, mask, window, self.sinks)
        return self.wo(out.transpose(1, 2).reshape(batch, seq_len, -1))
