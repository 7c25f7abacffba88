"""fully_shard per transformer block and at the root; mixed precision; activation checkpointing."""

from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from moe_dist.model import Transformer, moe_layers

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def mixed_precision(param_dtype: str, reduce_dtype: str, device: torch.device) -> MixedPrecisionPolicy:
    """bf16 parameters with fp32 reductions on CUDA, fp32 on CPU, unless configured."""
    if param_dtype == "auto":
        param_dtype = "bfloat16" if device.type == "cuda" else "float32"
    return MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])


def apply_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block's activations in backward instead of keeping them."""
    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_fsdp(model: Transformer, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy,
               expert_mesh: DeviceMesh | None = None, expert_grad_divide: int = 1) -> None:
    """Shard every block's parameters over `mesh`, then the rest (embeddings, norm, output) at the root.

    Under expert parallelism the experts get their own `fully_shard` over `expert_mesh` (the
    "dp_shard" ranks that hold the same experts), with gradients divided by `expert_grad_divide`.
    """
    if expert_mesh is not None:
        for moe in moe_layers(model):
            fully_shard(moe.experts, mesh=expert_mesh, mp_policy=mp_policy)
            moe.experts.set_gradient_divide_factor(expert_grad_divide)
            if expert_mesh.size() > 1:
                # Sum, then divide: gloo has no PREMUL_SUM. (Not on one rank, where FSDP would divide twice.)
                moe.experts.set_force_sum_reduction_for_comms(True)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp_policy)
    # The root's parameters are needed again at the start of backward: keep them gathered.
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)
