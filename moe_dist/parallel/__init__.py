"""Parallelism applied to a built model from the outside: FSDP2, activation checkpointing, EP."""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from moe_dist.config import ParallelConfig
from moe_dist.model import Transformer, moe_layers
from moe_dist.parallel.expert_parallel import apply_expert_parallel, auto_chunks
from moe_dist.parallel.fsdp import apply_compile_and_checkpointing, apply_fsdp, mixed_precision


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor; a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def parallelize(model: Transformer, cfg: ParallelConfig, mesh: DeviceMesh, device: torch.device,
                tokens_per_rank: int = 0) -> Transformer:
    """Make `model` train on every rank of `mesh` with the numbers one process would get. `tokens_per_rank`
    (a micro-batch's) sizes the expert-parallel chunks when `cfg.ep_chunks` is 0 (auto)."""
    # Every rank of ("dp_shard", "ep") reads different tokens: the batch is split over the flattened mesh.
    batch_mesh = mesh._flatten("batch") if mesh.size() > 1 else mesh
    if mesh.size() > 1:
        # The router's batch statistics are summed over the ranks that split the batch, not over WORLD, so
        # that a mesh axis which does not split it (tensor or pipeline parallelism) cannot double-count.
        reduce = functools.partial(funcol.all_reduce, reduceOp="sum", group=batch_mesh.get_group())
        for moe in moe_layers(model):
            moe.router.all_reduce_stats = reduce
    mp_policy = mixed_precision(cfg.param_dtype, cfg.reduce_dtype, device)
    ep_mesh = mesh["ep"]
    if ep_mesh.size() > 1:
        for moe in moe_layers(model):
            row_bytes = moe.experts.w1.shape[1] * mp_policy.param_dtype.itemsize
            chunks = cfg.ep_chunks or auto_chunks(device, tokens_per_rank * moe.router.top_k * row_bytes)
            apply_expert_parallel(moe, ep_mesh, chunks)
    apply_compile_and_checkpointing(model, cfg.compile, cfg.activation_checkpoint)  # the grouped GEMMs stay eager
    if ep_mesh.size() > 1:
        # An expert sees the tokens of its whole EP group, so its summed gradient is ep times a
        # dense weight's: divide by the world size rather than by the dp_shard ranks alone.
        apply_fsdp(model, batch_mesh, mp_policy, mesh["dp_shard"], expert_grad_divide=mesh.size())
    else:
        apply_fsdp(model, mesh["dp_shard"], mp_policy)
    return model


@torch.no_grad()
def clip_grad_norm_(parameters: list[torch.nn.Parameter], max_norm: float) -> float:
    """Global gradient norm over plain tensors and DTensors on any meshes; clip when max_norm > 0."""
    grads = [p.grad for p in parameters if p.grad is not None]
    by_mesh: dict[object, list[torch.Tensor]] = {}
    for g in grads:
        by_mesh.setdefault(g.device_mesh if isinstance(g, DTensor) else None, []).append(g)
    squares = []
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(group)
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2)
    total = torch.stack(squares).sum().sqrt().item() if squares else 0.0
    if max_norm > 0 and math.isfinite(total) and total > max_norm:
        torch._foreach_mul_(grads, max_norm / (total + 1e-6))
    return total
