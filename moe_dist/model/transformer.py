"""Decoder-only transformer: RMSNorm, rotary embeddings, GQA or MLA attention, SwiGLU or MoE FFN."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_dist.config import ModelConfig, MoEConfig
from moe_dist.model.attention import Attention
from moe_dist.model.masks import AttentionMask
from moe_dist.model.mla import MLA
from moe_dist.model.moe import FeedForward, GroupedExperts, MoE, MoEStats, moe_layers
from moe_dist.model.rotary import rotary_tables


@dataclass
class KVCache:
    """Preallocated keys and values of every layer: [n_layers, B, n_kv_heads, max_seq_len, head_dim]; under MLA the
    keys and values as expanded per head, [n_layers, B, n_heads, max_seq_len, qk_nope + qk_rope or v_head_dim]."""

    k: Tensor
    v: Tensor

    @classmethod
    def empty(cls, cfg: ModelConfig, batch_size: int, device=None, dtype: torch.dtype = torch.float32) -> KVCache:
        if cfg.attention == "mla":
            heads, k_dim, v_dim = cfg.n_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
        else:
            heads, k_dim, v_dim = cfg.n_kv_heads, cfg.head_size, cfg.head_size
        rows = (cfg.n_layers, batch_size, heads, cfg.max_seq_len)
        return cls(torch.zeros(*rows, k_dim, device=device, dtype=dtype),
                   torch.zeros(*rows, v_dim, device=device, dtype=dtype))


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
        self.attention = MLA(cfg) if cfg.attention == "mla" else Attention(cfg)
        self.window = 0 if layer_id in cfg.full_attention_layers else cfg.sliding_window
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = MoE(cfg.dim, moe) if is_moe_layer(layer_id, moe) else FeedForward(cfg.dim, cfg.ffn_hidden)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask,
                kv: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, MoEStats | None]:
        """-> (x, the MoE layer's stats; None in a dense block)."""
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, self.window, kv)
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
        if not cfg.tie_embeddings:  # tied: the logits come from tok_embeddings.weight
            self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if self.rope_cos.device.type != "meta":  # on meta, whoever materialises the model initialises it
            self.init_weights()

    def initial_value(self, name: str, shape: torch.Size, device: torch.device | str) -> Tensor:
        """The initial value of parameter `name`: norms 1, biases and sinks 0, the rest Normal(0, init_std) truncated
        at 3 std, with residual output projections' std scaled by 1/sqrt(2 * n_layers), drawn from a generator seeded
        by (seed, name) alone. So each parameter's value does not depend on how the model is later split over ranks."""
        if "norm" in name:
            return torch.ones(shape, device=device)
        if name.endswith(("bias", "sinks")):  # "bias": also the experts' w1_bias, w3_bias and w2_bias
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
        cos, sin = rotary_tables(self.cfg, device=self.rope_cos.device)
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
        mask = AttentionMask(tokens.shape[1], start_pos, segments, tokens.device)
        mask.prepare({layer.window for layer in self.layers}, self.cfg.attention_sinks)
        h = self.tok_embeddings(tokens)
        aux_loss = torch.zeros((), device=h.device)
        moe_stats = []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            h, stats = layer(h, cos, sin, mask, kv)
            if stats is not None:
                aux_loss = aux_loss + stats.aux_loss
                moe_stats.append(stats)
        h = self.norm(h)
        logits = F.linear(h, self.tok_embeddings.weight) if self.cfg.tie_embeddings else self.output(h)
        if not routing:
            return logits, aux_loss
        if not moe_stats:
            return logits, aux_loss, None
        return logits, aux_loss, Routing(torch.stack([s.counts for s in moe_stats]),
                                         torch.stack([s.dropped for s in moe_stats]))


def hidden_matrices(model: Transformer) -> list[nn.Parameter]:
    """The weights that map one hidden representation to another inside the blocks, which Muon orthogonalises:
    every projection of attention and of the dense and shared FFNs, and the expert stacks (an [E, a, b] stack is E
    matrices). Not the router, whose rows score experts against each other, nor the shared expert's gate (one value
    per token); not the embeddings, head, norms, biases or sinks either."""
    not_hidden = {id(p) for m in moe_layers(model) for gate in (m.router, m.shared_expert_gate) if gate is not None
                  for p in gate.parameters()}
    matrices = []
    for module in model.layers.modules():
        if isinstance(module, nn.Linear):
            matrices.append(module.weight)
        elif isinstance(module, GroupedExperts):
            matrices += [module.w1, module.w3, module.w2]
    return [p for p in matrices if id(p) not in not_hidden and p.requires_grad]
