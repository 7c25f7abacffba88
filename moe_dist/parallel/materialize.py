"""Allocate and initialise only this rank's shards of a model built on the meta device and parallelized."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from moe_dist.checkpoint import CheckpointError
from moe_dist.model import Transformer
from moe_dist.parallel.agreement import first_problem

WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")  # activation checkpointing, torch.compile


def plain_name(name: str) -> str:
    """A parameter's name in the plain model, without the wrappers that parallelism adds."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def filled_tensors(model: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """What start-up fills and a checkpoint holds: the parameters and the persistent buffers (the routers' selection
    biases), not the rotary tables, which are computed."""
    yield from model.named_parameters()
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                yield f"{module_name}.{name}" if module_name else name, buffer


# read(name, full shape, block) -> that block of the parameter's value: the initial values, or a checkpoint's.
BlockReader = Callable[[str, torch.Size, tuple[slice, ...]], Tensor]


def initial_values(model: Transformer, device: torch.device) -> BlockReader:
    """Blocks of the single-process model's initial values: each parameter's full value is drawn on its own
    (Transformer.initial_value: a generator seeded by the parameter's name) and the block cut out of it. Every
    rank draws the same full value, so the blocks fit together into exactly the single-process weights, whatever
    the world size and EP layout."""
    return lambda name, shape, block: model.initial_value(name, shape, device)[block]


@torch.no_grad()
def materialize(model: Transformer, device: torch.device, read: BlockReader | None = None) -> None:
    """Allocate this rank's shards, compute the rotary tables and fill each parameter and selection bias from `read`
    (default: the initial values), one at a time: a rank holds at most its shards plus one parameter's full value.
    A block that cannot be read (a CheckpointError: a bad file, a NaN) stops every rank, with the message of the rank
    that read it."""
    model.to_empty(device=device)
    model.init_buffers()
    problem = None
    try:
        _fill(model, read or initial_values(model, device))
    except CheckpointError as e:
        problem = str(e)
    problem = first_problem(problem)
    if problem is not None:
        raise CheckpointError(problem)


def _fill(model: Transformer, read: BlockReader) -> None:
    for name, param in filled_tensors(model):
        local = param.to_local() if isinstance(param, DTensor) else param
        if isinstance(param, DTensor):
            # DTensor's own arithmetic for where this rank's block lies (FSDP's and EP's shards nested included);
            # copying into it directly saves the extra copy that distribute_tensor(src_data_rank=None) makes.
            shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        else:
            shape, offset = param.shape, (0,) * param.dim()
        if local.numel():
            local.copy_(read(plain_name(name), param.shape, tuple(slice(o, o + n) for o, n in zip(offset, shape))))
