"""Decoder-only transformer: RMSNorm, rotary embeddings, GQA attention (SDPA), SwiGLU or MoE FFN."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_dist.config import ModelConfig, MoEConfig
from moe_dist.model.moe import FeedForward, MoE, MoEStats


def rotary_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[Tensor, Tensor]:
    """cos and sin [max_seq_len, head_dim] in the half-split layout (as Llama/Mixtral in HF)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, S, hd]; cos, sin [S, hd], or [B, 1, S, hd] for positions of each sequence's own."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


@dataclass
class KVCache:
    """Preallocated keys and values of every layer: [n_layers, B, n_kv_heads, max_seq_len, head_dim]."""

    k: Tensor
    v: Tensor

    @classmethod
    def empty(cls, cfg: ModelConfig, batch_size: int, device=None, dtype: torch.dtype = torch.float32) -> KVCache:
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_size)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))


class Attention(nn.Module):
    """Causal grouped-query attention through scaled_dot_product_attention, with the q/k options of the open MoE
    families: biases on q, k, v; RMSNorm on q and k per head or over the whole projection; clamping q, k, v."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_size
        self.qk_norm = cfg.qk_norm
        self.clip_qkv = cfg.clip_qkv
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        if cfg.qk_norm != "none":
            per_head = cfg.qk_norm == "head"
            self.q_norm = nn.RMSNorm(self.head_dim if per_head else self.wq.out_features, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim if per_head else self.wk.out_features, eps=cfg.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: tuple[Tensor, Tensor] | None = None,
                start_pos: int = 0, mask: Tensor | None = None) -> Tensor:
        """x holds positions start_pos...; kv, this layer's (keys, values) cache, receives them. `mask`
        [B, 1, S, S] (True: may attend) replaces the causal mask, e.g. to keep packed documents apart."""
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
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is not None:
            end = start_pos + seq_len
            kv[0][:, :, start_pos:end] = k
            kv[1][:, :, start_pos:end] = v
            k, v = kv[0][:, :, :end], kv[1][:, :, :end]
            if start_pos > 0:  # the new queries see every cached key and the causal part of their own block
                mask = torch.ones(seq_len, end, dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(batch, seq_len, -1))


def document_causal_mask(segments: Tensor) -> Tensor:
    """[B, S] document ids -> [B, 1, S, S], True where query i may attend key j: j <= i in the same document
    (block-diagonal causal). A dense mask through SDPA: on CPU, flex_attention has no backward in this torch."""
    seq_len = segments.shape[1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=segments.device).tril()
    return (segments.unsqueeze(2) == segments.unsqueeze(1)).unsqueeze(1) & causal


def is_moe_layer(layer_id: int, moe: MoEConfig) -> bool:
    return (moe.num_experts > 0 and layer_id >= moe.first_k_dense and layer_id not in moe.dense_layers
            and (layer_id - moe.first_k_dense) % moe.every_n_layers == 0)


class Routing(NamedTuple):
    """What the routers of the MoE layers did in one forward, for metrics and the aux-free bias update."""

    counts: Tensor  # [moe layers, E] float, pairs routed to each expert over the whole (reduced) batch
    dropped: Tensor  # [moe layers] int64, pairs dropped by capacity on this process


class Block(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig, moe: MoEConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = MoE(cfg.dim, moe) if is_moe_layer(layer_id, moe) else FeedForward(cfg.dim, cfg.ffn_hidden)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: tuple[Tensor, Tensor] | None = None,
                start_pos: int = 0, mask: Tensor | None = None) -> tuple[Tensor, MoEStats | None]:
        """-> (x, the MoE layer's stats; None in a dense block)."""
        x = x + self.attention(self.attention_norm(x), cos, sin, kv, start_pos, mask)
        if isinstance(self.ffn, MoE):
            out, stats = self.ffn(self.ffn_norm(x))
            return x + out, stats
        return x + self.ffn(self.ffn_norm(x)), None


def truncated_normal_(tensor: Tensor, std: float, generator: torch.Generator) -> Tensor:
    """Normal(0, std) truncated to +-3 std, in place by the inverse CDF. Unlike torch's rejection sampler
    (nn.init.trunc_normal_, which holds about three more tensors of the same size), drawing a parameter needs
    no memory beyond the parameter: start-up's peak stays at a rank's shards plus the largest parameter."""
    edge = math.erf(3 / math.sqrt(2))  # the +-3 std bounds, mapped through 2 * cdf - 1
    return tensor.uniform_(-edge, edge, generator=generator).erfinv_().mul_(std * math.sqrt(2))


class Transformer(nn.Module):
    """tokens [B, S] -> (logits [B, S, V], aux_loss summed over the MoE layers), and with `routing` the MoE
    layers' Routing as a third output (None without MoE layers).

    For inference, `cache` (a KVCache) keeps the keys and values of the positions before
    `start_pos`, so that only the new tokens need to be fed.
    """

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(i, cfg, moe) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg.head_size, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if self.rope_cos.device.type != "meta":  # on meta, whoever materialises the model initialises it
            self.init_weights()

    def initial_value(self, name: str, shape: torch.Size, device: torch.device | str) -> Tensor:
        """The initial value of parameter `name`: norms 1, biases 0, the rest Normal(0, init_std) truncated at 3 std,
        with residual output projections' std scaled by 1/sqrt(2 * n_layers), drawn from a generator seeded by
        (seed, name) alone. So each parameter's value does not depend on how the model is later split over ranks."""
        if "norm" in name:
            return torch.ones(shape, device=device)
        if name.endswith(".bias"):
            return torch.zeros(shape, device=device)
        scale = 1 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("wo.weight", "w2.weight", "experts.w2")) else 1
        key = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
        generator = torch.Generator(device).manual_seed(int.from_bytes(key[:8], "little") >> 1)
        return truncated_normal_(torch.empty(shape, device=device), self.cfg.init_std * scale, generator)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Every parameter set to its initial_value, then the buffers."""
        for name, param in self.named_parameters():
            param.copy_(self.initial_value(name, param.shape, param.device))
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """The routers' selection biases to zero, the rotary tables computed."""
        for module in self.modules():
            if isinstance(module, MoE):
                module.router.expert_bias.zero_()
        cos, sin = rotary_tables(self.cfg.head_size, self.cfg.max_seq_len, self.cfg.rope_theta,
                                 device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, tokens: Tensor, cache: KVCache | None = None, start_pos: int = 0,
                segments: Tensor | None = None, positions: Tensor | None = None,
                routing: bool = False) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Routing | None]:
        """`segments` [B, S]: the document each token belongs to (packed windows); attention stays within a
        document. `positions` [B, S]: each token's rotary position, e.g. restarting at every document."""
        end = start_pos + tokens.shape[1]
        if end > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {end} tokens exceeds model.max_seq_len = {self.cfg.max_seq_len}")
        if start_pos and cache is None:
            raise ValueError("start_pos > 0 needs the KVCache that holds the earlier positions")
        if positions is None:
            cos, sin = self.rope_cos[start_pos:end], self.rope_sin[start_pos:end]
        else:
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
        mask = None if segments is None else document_causal_mask(segments)
        h = self.tok_embeddings(tokens)
        aux_loss = torch.zeros((), device=h.device)
        moe_stats = []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            h, stats = layer(h, cos, sin, kv, start_pos, mask)
            if stats is not None:
                aux_loss = aux_loss + stats.aux_loss
                moe_stats.append(stats)
        logits = self.output(self.norm(h))
        if not routing:
            return logits, aux_loss
        if not moe_stats:
            return logits, aux_loss, None
        return logits, aux_loss, Routing(torch.stack([s.counts for s in moe_stats]),
                                         torch.stack([s.dropped for s in moe_stats]))
