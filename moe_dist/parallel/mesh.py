"""Process group and DeviceMesh from the parallel config and the world size."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moe_dist.config import ConfigError, ParallelConfig


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
        backend = "nccl" if use_cuda else "gloo"
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


def resolve_ep(cfg: ParallelConfig, num_experts: int, world_size: int) -> int:
    """parallel.ep, with 0 (auto) spreading the experts over as many ranks as divide both."""
    return cfg.ep if cfg.ep > 0 else math.gcd(world_size, max(num_experts, 1))


def mesh_shape(cfg: ParallelConfig, world_size: int) -> tuple[int, int]:
    """(dp_shard, ep), checked against the world size before any collective runs."""
    if world_size % cfg.ep != 0:
        raise ConfigError(f"config: parallel.ep = {cfg.ep} must divide the world size {world_size} "
                          f"(nodes x --nproc_per_node)")
    dp_shard = world_size // cfg.ep if cfg.dp_shard == -1 else cfg.dp_shard
    if dp_shard * cfg.ep != world_size:
        raise ConfigError(f"config: parallel.dp_shard = {cfg.dp_shard} x parallel.ep = {cfg.ep} "
                          f"must equal the world size {world_size} (nodes x --nproc_per_node)")
    return dp_shard, cfg.ep


def build_mesh(cfg: ParallelConfig, world_size: int, device_type: str) -> DeviceMesh:
    """2-D mesh ("dp_shard", "ep"), ep innermost so an EP group is consecutive ranks."""
    return init_device_mesh(device_type, mesh_shape(cfg, world_size), mesh_dim_names=("dp_shard", "ep"))
