"""One rank of a large run, simulated in this process: a fake process group, meta tensors, no compute.

The model is built on meta, parallelized and given its AdamW states by the same code a real rank runs
(`build_mesh`, `parallelize`, `build_optimizer`), only the collectives do nothing and no tensor has storage.
So a config can be checked at a world size no test machine has: the mesh resolves, FSDP2 and EP shard it,
and each rank's shards are what the memory planner (`moe_dist.params`) says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

from moe_dist.config import Config
from moe_dist.memory import local_shard_shapes, meta_model, shard_bytes
from moe_dist.model import Transformer
from moe_dist.optim import build_optimizer
from moe_dist.parallel import local_part, parallelize
from moe_dist.parallel.materialize import plain_name
from moe_dist.parallel.mesh import build_mesh


@dataclass
class RankShards:
    """What one rank holds: each parameter's local shard shape, and the bytes of its parameter, gradient and
    AdamW shards."""

    rank: int
    shapes: dict[str, tuple[int, ...]]
    params: int
    grads: int
    optimizer: int
    muon: str = ""  # with optim.name = "muon": its plan's balance and bytes over the whole world (MuonPlan.summary)


def _nbytes(tensors) -> int:
    return sum(math.prod(local_part(t).shape) * t.element_size() for t in tensors)


def simulate_rank(cfg: Config, world: int, rank: int) -> RankShards:
    """Rank `rank` of `world`: its model shards and, after one AdamW step, its optimizer states."""
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        mesh = build_mesh(cfg, world, "cpu")
        with torch.device("meta"):
            model = Transformer(cfg.model, cfg.moe, seed=cfg.train.seed)
        parallelize(model, cfg.parallel, mesh, torch.device("cpu"))
        params = list(model.parameters())
        # FSDP2 gives each reduce-scattered gradient its parameter's DTensor spec (test_memory checks the
        # real ones at world 2 and 4); here they are placed so that AdamW's own step creates its states.
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
        optimizer.step()
        states = [t for state in optimizer.state.values() for t in state.values()]
        return RankShards(rank, {plain_name(n): tuple(local_part(p).shape) for n, p in model.named_parameters()},
                          params=_nbytes(params), grads=_nbytes(p.grad for p in params),
                          optimizer=_nbytes(states), muon=optimizer.plan.summary() if cfg.optim.name == "muon" else "")
    finally:
        dist.destroy_process_group()


def planned_rank(cfg: Config, world: int, rank: int) -> RankShards:
    """The same figures from the memory planner."""
    model = meta_model(cfg)
    return RankShards(rank, local_shard_shapes(cfg, world, rank, model), *shard_bytes(cfg, world, rank, model))


def simulated_ranks(world: int) -> list[int]:
    """The first two ranks, the middle one and the last: both ends of every mesh dimension."""
    return sorted({0, 1, world // 2, world - 1} & set(range(world)))
