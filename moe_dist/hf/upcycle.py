"""Upcycling: an MoE of a dense model's width and depth, started from that model's weights.

Everything but the MoE layers' routers and experts is the dense model's. With g = model.ffn_hidden /
moe.expert_hidden segments, expert e is segment e % g of copy e // g of the layer's dense MLP: w1 / w3 from the
gate / up rows of that segment, w2 from the down columns of that segment times g. The router keeps the MoE model's
own initial values, but the rows of one copy's g segments are tied to the copy's first row: a copy's segments score
alike, top-k (a multiple of g) takes whole copies, each segment gets its copy's combine weight / g, and the layer
gives sum_copies c_copy * mlp(x): the dense MLP's output where the combine weights sum to one. The random rows send
different tokens to different copies, so that training tells the copies apart. Every value is drawn or read whole
per parameter (and expert) and cut to the block asked for: the same weights at every layout.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch
from torch import Tensor

from moe_dist.config import Config, ConfigError
from moe_dist.model.transformer import Transformer
from moe_dist.parallel.materialize import BlockReader

Block = tuple[slice, ...]
EXPERTS = ("experts.w1", "experts.w3", "experts.w2")  # ours, under layers.<i>.ffn.


def segments(cfg: Config) -> int:
    """How many experts one copy of the dense MLP makes: model.ffn_hidden / moe.expert_hidden."""
    return cfg.model.ffn_hidden // cfg.moe.expert_hidden


def _refuse(bad: bool, message: str) -> None:
    if bad:
        raise ConfigError(f"config: {message}")


def check_upcycle(cfg: Config, source: str) -> None:
    """ConfigError naming the moe.* key that keeps cfg's experts from starting as copies of `source`'s dense MLP."""
    m, moe = cfg.model, cfg.moe
    mlp = f"{source}'s dense MLP"
    _refuse(moe.shared_expert_hidden > 0, f"moe.shared_expert_hidden = {moe.shared_expert_hidden}: upcycling {mlp} "
                                          f"starts routed experts only (set it to 0)")
    _refuse(moe.expert_act != "swiglu", f"moe.expert_act = {moe.expert_act!r} cannot start from {mlp}, a SwiGLU")
    _refuse(m.ffn_hidden % moe.expert_hidden != 0, f"moe.expert_hidden = {moe.expert_hidden} must divide "
                                                   f"model.ffn_hidden = {m.ffn_hidden} of {source} (each expert is "
                                                   f"the dense MLP or an equal segment of it)")
    g = segments(cfg)
    whole = f"the {g} segments of {mlp} (model.ffn_hidden {m.ffn_hidden} / moe.expert_hidden {moe.expert_hidden})"
    _refuse(moe.num_experts % g != 0, f"moe.num_experts = {moe.num_experts} must be a multiple of {whole}: the "
                                      f"experts are whole copies")
    _refuse(moe.top_k % g != 0, f"moe.top_k = {moe.top_k} must be a multiple of {whole}: top-k must take whole "
                                f"copies for the output to be preserved")
    group = moe.num_experts // moe.n_group
    _refuse(group % g != 0, f"moe.n_group = {moe.n_group} must leave whole copies of {mlp} in each group ({group} "
                            f"experts, copies of {g})")


def dense_config(cfg: Config) -> Config:
    """The dense model an upcycled `cfg` starts from: the same model, no experts."""
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, num_experts=0))


def _generator(seed: int, name: str, expert: int) -> torch.Generator:
    key = hashlib.sha256(f"{seed}:{name}:upcycle_noise:{expert}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)


class UpcycledWeights:
    """The upcycled MoE's parameters and selection biases, read a block at a time from the dense model's (`dense`,
    under our dense names: an HFWeights' read) and initial values; `read` is the BlockReader materialize takes."""

    def __init__(self, cfg: Config, dense: BlockReader, dense_shapes: dict[str, torch.Size]):
        self.dense, self.dense_shapes = dense, dense_shapes
        self.segments, self.noise, self.seed = segments(cfg), cfg.train.upcycle_noise, cfg.train.seed
        with torch.device("meta"):  # for initial_value alone: the routers' and the biases' starting values
            self.model = Transformer(cfg.model, cfg.moe, seed=cfg.train.seed)
        self._rms: dict[str, float] = {}

    def read(self, name: str, shape: torch.Size, block: Block) -> Tensor:
        """Block `block` of parameter or buffer `name` (whole shape `shape`) of the upcycled model."""
        if name in self.dense_shapes:
            return self.dense(name, shape, block)
        layer, _, part = name.partition(".ffn.")
        if part in EXPERTS:
            return self._experts(layer, part, shape, block)
        initial = self.model.initial_value(name, shape, "cpu")  # biases 0, selection biases 0 (buffers)
        if part == "router.gate.weight":
            first = torch.arange(shape[0]) // self.segments * self.segments  # each copy's first expert
            initial = initial[first]
        return initial[block]

    def _experts(self, layer: str, part: str, shape: torch.Size, block: Block) -> Tensor:
        """Experts `block[0]` of w1 / w3 ([E, dim, hidden]: the dense gate / up rows of each one's segment,
        transposed) or w2 ([E, hidden, dim]: the down columns, transposed, times g), plus noise."""
        experts, rows, cols = block
        w = part[-2:]
        key = f"{layer}.ffn.{w}.weight"
        down = w == "w2"
        hidden = shape[1] if down else shape[2]  # moe.expert_hidden
        inside = rows if down else cols  # the block's span of the expert's hidden dimension
        by_segment = {}
        for s in {e % self.segments for e in range(experts.start, experts.stop)}:
            span = slice(s * hidden + inside.start, s * hidden + inside.stop)
            value = self.dense(key, self.dense_shapes[key], (cols, span) if down else (span, rows)).T
            by_segment[s] = value * self.segments if down else value
        out = torch.stack([by_segment[e % self.segments] for e in range(experts.start, experts.stop)])
        if self.noise:
            std = self.noise * self._dense_rms(key) * (self.segments if down else 1)
            out += torch.stack([torch.randn(shape[1:], generator=_generator(self.seed, f"{layer}.ffn.{part}", e))
                                [rows, cols] for e in range(experts.start, experts.stop)]) * std
        return out

    def _dense_rms(self, key: str) -> float:
        """The root mean square of the dense weight `key`, read whole once: the same at every layout."""
        if key not in self._rms:
            shape = self.dense_shapes[key]
            self._rms[key] = self.dense(key, shape, tuple(slice(0, n) for n in shape)).square().mean().sqrt().item()
        return self._rms[key]
