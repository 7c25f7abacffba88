"""Process group and DeviceMesh from the parallel config and the world size."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moe_dist.config import Config, ConfigError, ParallelConfig


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed(device: str = "auto") -> Runtime:
    """NCCL with CUDA, gloo without; a one-process group when not launched by torchrun."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config: train.device = 'cuda' but no CUDA device is available")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        # NCCL for the model's CUDA tensors, gloo beside it for the small CPU tensors the trainer reduces (loss and
        # routing totals, the preemption flag): NCCL alone refuses a CPU tensor.
        backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
        if "RANK" in os.environ:
            store, rank, world_size = next(dist.rendezvous("env://"))
            # torchrun --max-restarts keeps its store across restarts: without a per-attempt prefix the
            # restarted ranks read the dead ones' addresses (gloo: "connectFullMesh ... refused").
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group(backend, store=dist.PrefixStore(f"attempt_{attempt}", store), rank=rank,
                                    world_size=world_size, device_id=dev if use_cuda else None)
        else:  # plain `python -m moe_dist.train`: the same code path with a world of one
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Runtime(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def resolve_mesh(cfg: ParallelConfig, num_experts: int, world_size: int) -> ParallelConfig:
    """`cfg` with ep (0 = auto: as many ranks as divide both the world size and num_experts) and dp_shard
    (-1 = the rest) resolved for `world_size`; ConfigError, before any collective, when they do not fit.
    The one place that decides the mesh: the trainer, the memory planner and the benchmarks all use it."""
    ep = cfg.ep if cfg.ep > 0 else math.gcd(world_size, max(num_experts, 1))
    if world_size % ep != 0:
        raise ConfigError(f"config: parallel.ep = {ep} must divide the world size {world_size} "
                          f"(nodes x --nproc_per_node)")
    dp_shard = world_size // ep if cfg.dp_shard == -1 else cfg.dp_shard
    if dp_shard * ep != world_size:
        raise ConfigError(f"config: parallel.dp_shard = {cfg.dp_shard} x parallel.ep = {ep} "
                          f"must equal the world size {world_size} (nodes x --nproc_per_node)")
    return dataclasses.replace(cfg, ep=ep, dp_shard=dp_shard)


def build_mesh(cfg: Config, world_size: int, device_type: str) -> DeviceMesh:
    """2-D mesh ("dp_shard", "ep"), ep innermost so an EP group is consecutive ranks."""
    parallel = resolve_mesh(cfg.parallel, cfg.moe.num_experts, world_size)
    return init_device_mesh(device_type, (parallel.dp_shard, parallel.ep), mesh_dim_names=("dp_shard", "ep"))
