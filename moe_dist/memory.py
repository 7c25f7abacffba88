"""Per-device memory under FSDP2 + expert parallelism: parameters, gradients, optimizer states, buffers,
activations.

Shard sizes follow `moe_dist.parallel` exactly: dense tensors are split on dim 0 over all ranks;
under EP each rank holds E / ep experts, split over the dp_shard ranks that hold the same ones, on dim 0
when they divide evenly and on their last dim otherwise (`expert_shard_dim`); FSDP2 cuts like
`torch.chunk`, so rank 0 has the largest shard of every tensor.
Activations are estimated from what autograd saves in this model's forward (see `activation_bytes`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from moe_dist.config import Config, ModelConfig
from moe_dist.model import Transformer, hidden_matrices
from moe_dist.model.moe import GroupedExperts
from moe_dist.model.transformer import is_moe_layer
from moe_dist.parallel.fsdp import expert_shard_dim
from moe_dist.parallel.mesh import resolve_mesh

FP32 = 4
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
HEADROOM = 0.10  # of device memory, kept free for the CUDA context, NCCL buffers and fragmentation


def _chunk_rows(rows: int, parts: int, index: int) -> int:
    """Rows of part `index` when `rows` are cut like torch.chunk(rows, parts)."""
    size = math.ceil(rows / parts)
    return max(0, min(size, rows - index * size))


def meta_model(cfg: Config) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg.model, cfg.moe)


def local_shard_shapes(cfg: Config, world: int, rank: int, model: Transformer | None = None) -> dict[str, tuple]:
    """{parameter name: shape of its local shard on `rank`} for a run of `world` ranks (model: cfg's, on meta)."""
    ep = resolve_mesh(cfg.parallel, cfg.moe.num_experts, world).ep
    model = model if model is not None else meta_model(cfg)
    expert_params = {f"{module_name}.{name}" for module_name, module in model.named_modules()
                     if isinstance(module, GroupedExperts) for name, _ in module.named_parameters()}
    shapes = {}
    for name, param in model.named_parameters():
        shape = list(param.shape)
        ranks, index = world, rank
        if name in expert_params:
            shape[0] //= ep
            ranks, index = world // ep, rank // ep
            dim = expert_shard_dim(shape[0], ranks, len(shape))
        else:
            dim = 0
        shape[dim] = _chunk_rows(shape[dim], ranks, index)
        shapes[name] = tuple(shape)
    return shapes


def local_shard_numels(cfg: Config, world: int, rank: int, model: Transformer | None = None) -> dict[str, int]:
    return {name: math.prod(shape) for name, shape in local_shard_shapes(cfg, world, rank, model).items()}


def shard_bytes(cfg: Config, world: int, rank: int, model: Transformer | None = None) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer states) bytes on `rank`: fp32 shards; AdamW's two moments plus a step
    scalar per tensor, and with optim.name = "muon" one momentum for each hidden matrix instead."""
    model = model if model is not None else meta_model(cfg)
    numels = local_shard_numels(cfg, world, rank, model)
    params = FP32 * sum(numels.values())
    muon = set()
    if cfg.optim.name == "muon":
        matrices = {id(p) for p in hidden_matrices(model)}
        muon = {name for name, p in model.named_parameters() if id(p) in matrices}
    momenta = sum(n for name, n in numels.items() if name in muon)
    adamw = sum(n for name, n in numels.items() if name not in muon)
    return params, params, FP32 * (momenta + 2 * adamw + len(numels) - len(muon))


def activation_dtype_bytes(cfg: Config, device_type: str) -> int:
    dtype = cfg.parallel.param_dtype
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" else "float32"
    return DTYPE_BYTES[dtype]


def attention_activation_bytes(m: ModelConfig, tokens: int, act: int) -> int:
    """What one attention layer keeps for backward: its norm's input and output; the kernel's q, k, v, output and
    fp32 log-sum-exp per head (flash, memory-efficient or flex on CUDA: never [S, S]); the output's copy into `wo`.

    GQA: q and k after rotary, and before a qk norm too. MLA: the q and kv latents before and after their norms,
    the expanded keys, all of wkv_b's output (v is a view of it). Sinks (flex on CUDA, GQA only): the softmax's
    share kept per query and head, in fp32 and as cast to multiply the output.
    """
    if m.attention == "mla":
        qk = m.n_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim)
        v = m.n_heads * m.v_head_dim
        latents = 2 * m.q_lora_rank + (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
        per_token = 2 * qk + m.n_heads * (m.qk_nope_head_dim + m.v_head_dim) + 2 * v + latents
    else:
        q_dim, kv_dim = m.n_heads * m.head_size, m.n_kv_heads * m.head_size
        per_token = 3 * q_dim + 2 * kv_dim + (q_dim + kv_dim if m.qk_norm != "none" else 0)
    sinks = (FP32 + act) * m.n_heads if m.attention_sinks and m.attention != "mla" else 0
    return tokens * (act * (2 * m.dim + per_token) + FP32 * m.n_heads + sinks)


def activation_bytes(cfg: Config, act: int) -> tuple[int, int, int]:
    """(blocks without checkpointing, blocks with it, output head) for one micro-batch; act = bytes per element.

    Per block, what autograd keeps: the attention's (attention_activation_bytes); the second norm's input and
    output; then either the dense SwiGLU's four [T, hidden] tensors, or the router's fp32 [T, E] scores and the
    routed rows (permuted input, x W1, x W3, expert output: top_k rows per token; with expert biases each row's
    int64 expert). With checkpointing a block keeps only its input, and one block at a time is recomputed in
    backward. The head keeps the logits, their fp32 log-softmax and gradient.
    """
    m, moe = cfg.model, cfg.moe
    tokens = cfg.data.micro_batch * cfg.data.seq_len
    attention = attention_activation_bytes(m, tokens, act)
    norms = tokens * act * 2 * m.dim
    blocks = []
    for layer in range(m.n_layers):
        if is_moe_layer(layer, moe):
            routed = tokens * moe.top_k * (act * (2 * m.dim + 2 * moe.expert_hidden) + (8 if moe.expert_biases else 0))
            ffn = routed + tokens * FP32 * 4 * moe.num_experts + tokens * act * 4 * moe.shared_expert_hidden
        else:
            ffn = tokens * act * 4 * m.ffn_hidden
        blocks.append(attention + norms + ffn)
    head = tokens * (act * 2 * m.dim + (act + 2 * FP32) * m.vocab_size)
    checkpointed = m.n_layers * tokens * act * m.dim + max(blocks)
    return sum(blocks), checkpointed, head


@dataclass
class MemoryPlan:
    """Bytes on the most loaded device (rank 0)."""

    world: int
    dp_shard: int
    ep: int
    params: int  # fp32 shards (FSDP2 keeps the sharded parameters in their original dtype)
    grads: int  # fp32 shards
    optimizer: int  # AdamW exp_avg and exp_avg_sq plus a step scalar per tensor; Muon's matrices: a momentum
    buffers: int  # transient: unsharded root, two blocks all-gathered, one block's unsharded gradients
    activations: int  # one micro-batch, no activation checkpointing
    activations_checkpointed: int  # one micro-batch, with activation checkpointing

    def total(self, checkpointed: bool) -> int:
        acts = self.activations_checkpointed if checkpointed else self.activations
        return self.params + self.grads + self.optimizer + self.buffers + acts


def plan_memory(cfg: Config, world: int, device_type: str = "cuda") -> MemoryPlan:
    """Per-device memory of a training run of `cfg` on `world` ranks (ConfigError for an impossible mesh)."""
    parallel = resolve_mesh(cfg.parallel, cfg.moe.num_experts, world)
    dp_shard, ep = parallel.dp_shard, parallel.ep
    model = meta_model(cfg)
    params, grads, optimizer = shard_bytes(cfg, world, rank=0, model=model)

    act = activation_dtype_bytes(cfg, device_type)
    root = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("layers."))
    block_numels = []
    for block in model.layers:
        numel = 0
        for module in block.modules():
            share = ep if isinstance(module, GroupedExperts) else 1
            numel += sum(p.numel() for p in module.parameters(recurse=False)) // share
        block_numels.append(numel)
    reduce = DTYPE_BYTES[cfg.parallel.reduce_dtype]
    buffers = (root + 2 * max(block_numels)) * act + max(block_numels) * reduce

    blocks, checkpointed, head = activation_bytes(cfg, act)
    return MemoryPlan(world, dp_shard, ep, params=params, grads=grads, optimizer=optimizer, buffers=buffers,
                      activations=blocks + head, activations_checkpointed=checkpointed + head)


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB' (10^9), '80G' (GiB, as schedulers and nvidia-smi mean it) or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(I?B?)\s*", text.upper())
    if match is None:
        raise ValueError(f"not a size: {text!r}")
    number, prefix, suffix = match.groups()
    power = "KMGT".index(prefix) + 1 if prefix else 0
    scale = 1000 ** power if suffix == "B" and prefix else 1024 ** power
    return int(float(number) * scale)


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
