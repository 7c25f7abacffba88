"""fully_shard per transformer block and at the root; mixed precision; torch.compile and activation checkpointing
per block."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from moe_dist.model import Transformer, moe_layers

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def mixed_precision(param_dtype: str, reduce_dtype: str, device: torch.device) -> MixedPrecisionPolicy:
    """bf16 parameters with fp32 reductions on CUDA, fp32 on CPU, unless configured."""
    if param_dtype == "auto":
        param_dtype = "bfloat16" if device.type == "cuda" else "float32"
    return MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])


def apply_compile_and_checkpointing(model: Transformer, compile: bool, checkpoint: bool) -> None:
    """torch.compile each block in place (parameter names unchanged), then wrap it to recompute its activations
    in backward instead of keeping them.

    Compiled inside the checkpoint, not around it: dynamo captures a checkpoint only as one whole graph, and an MoE
    block always breaks its graph at the grouped GEMMs (eager, they sync with the host), so a compiled checkpoint
    ran its whole block eagerly.
    """
    for i, block in enumerate(model.layers):
        if compile:
            block.compile()
        if checkpoint:
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def expert_shard_dim(local_experts: int, ranks: int, ndim: int = 3) -> int:
    """The dim FSDP cuts an [E_local, ...] expert tensor of `ndim` dims on over `ranks`: dim 0 when the experts
    divide evenly, else the last dim (the hidden size or D, thousands of rows). Cut on dim 0, 2 experts over 8
    ranks would leave 6 ranks holding no expert weights and 2 holding all of them (the 3b config at ep 8 x
    dp_shard 8: rank 0 held 30x rank 63's parameters). For the [E, D, H] / [E, H, D] weights the last dim is
    the row dim of each expert's matrix in Hugging Face checkpoints (gate/up [hidden, D], down [D, hidden]), so
    an imported rank reads whole rows, not a column strip touching every page of its experts; for the [E, H] /
    [E, D] biases it is their only other dim."""
    return 0 if local_experts % ranks == 0 else ndim - 1


def _expert_placement(model: Transformer, ranks: int, ep: int) -> Callable[[nn.Parameter], Shard | None]:
    """FSDP2's shard_placement_fn: expert tensors on expert_shard_dim, everything else on dim 0 (None)."""
    experts = {id(p): expert_shard_dim(p.shape[0] // ep, ranks, p.dim())
               for moe in moe_layers(model) for p in moe.experts.parameters()}
    return lambda param: Shard(experts[id(param)]) if id(param) in experts else None


def apply_fsdp(model: Transformer, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy,
               expert_mesh: DeviceMesh | None = None, expert_grad_divide: int = 1) -> None:
    """Shard every block's parameters over `mesh`, then the rest (embeddings, norm, output) at the root.

    Under expert parallelism the experts get their own `fully_shard` over `expert_mesh` (the
    "dp_shard" ranks that hold the same experts), with gradients divided by `expert_grad_divide`.
    """
    if expert_mesh is not None:
        expert_placement = _expert_placement(model, expert_mesh.size(), ep=mesh.size() // expert_mesh.size())
        for moe in moe_layers(model):
            fully_shard(moe.experts, mesh=expert_mesh, mp_policy=mp_policy, shard_placement_fn=expert_placement)
            moe.experts.set_gradient_divide_factor(expert_grad_divide)
            if expert_mesh.size() > 1:
                # Sum, then divide: gloo has no PREMUL_SUM. (Not on one rank, where FSDP would divide twice.)
                moe.experts.set_force_sum_reduction_for_comms(True)
        block_placement = None  # the experts are sharded already, by their own fully_shard
    else:
        block_placement = _expert_placement(model, mesh.size(), ep=1)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, shard_placement_fn=block_placement)
    # The root's parameters are needed again at the start of backward: keep them gathered.
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)
