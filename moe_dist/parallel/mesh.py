"""Process group and DeviceMesh from the parallel config and the world size."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

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


def init_distributed(device: str = "auto", init_method: str = "env://") -> Runtime:
    """NCCL with CUDA, gloo without; a one-process group when RANK is not set (not launched by torchrun).

    Every process group the project starts comes from here: the trainer's, the benchmarks' and gpu-check's ranks
    and the test ranks (these set RANK, WORLD_SIZE and LOCAL_RANK and meet at a `file://` init_method)."""
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
            store, rank, world_size = next(dist.rendezvous(init_method, int(os.environ["RANK"]),
                                                           int(os.environ["WORLD_SIZE"])))
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                # The ranks share torchrun's own store, which outlives a restart: without a per-attempt prefix
                # the restarted ranks read the dead ones' addresses (gloo: "connectFullMesh ... refused"). The
                # attempt is each agent's own count, which agents on several nodes can disagree on (one restarts
                # after a failure, another after the membership change): our launchers set
                # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, so that each attempt gets a store of its own instead.
                attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
                store = dist.PrefixStore(f"attempt_{attempt}", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                    device_id=dev if use_cuda else None)
        else:  # plain `python -m moe_dist.train`: the same code path with a world of one
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Runtime(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def exit_process(code: int) -> NoReturn:
    """Leave a process that joined a process group (the trainer, a benchmark or test rank) with `code`, without
    the interpreter's teardown."""
    # FSDP and DTensor's caches keep the gloo process groups alive past destroy_process_group, so their worker
    # threads still run; one that releases the tensors of the last collective while the interpreter is
    # finalizing cannot take the GIL, and the process aborts after finished work ("terminate called without an
    # active exception", about one run in 30 here). Whatever the caller wrote is closed by now; only Python's
    # own buffers need flushing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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
