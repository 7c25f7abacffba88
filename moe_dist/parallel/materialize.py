"""Allocate and initialise only this rank's shards of a model built on the meta device and parallelized."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from moe_dist.model import Transformer

WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")  # activation checkpointing, torch.compile


def plain_name(name: str) -> str:
    """A parameter's name in the plain model, without the wrappers that parallelism adds."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


@torch.no_grad()
def materialize(model: Transformer, device: torch.device) -> None:
    """Give every parameter the value the single-process model gives it, holding only this rank's shards.

    Each parameter's full initial value is drawn on its own (Transformer.initial_value: a generator seeded by
    the parameter's name), this rank keeps its part, and the full tensor is dropped before the next one: a rank
    holds at most its shards plus the largest single parameter. Every rank draws the same full value, so the
    shards fit together into exactly the single-process weights, whatever the world size and EP layout.
    """
    model.to_empty(device=device)
    for name, param in model.named_parameters():
        full = model.initial_value(plain_name(name), param.shape, device)
        if isinstance(param, DTensor):
            # Every rank already holds the full value, so each copies its own block out of it: DTensor's own
            # arithmetic for where that block lies (FSDP's and EP's shards nested included), without the extra
            # copy of the block that distribute_tensor(src_data_rank=None) makes.
            shape, offset = compute_local_shape_and_global_offset(full.shape, param.device_mesh, param.placements)
            param.to_local().copy_(full[tuple(slice(o, o + n) for o, n in zip(offset, shape))])
        else:
            param.copy_(full)
        del full
    model.init_buffers()
