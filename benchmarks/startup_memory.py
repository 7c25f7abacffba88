"""python -m benchmarks.startup_memory: each rank's peak memory while the model is built, against its shards.

The small config at world 4 on gloo (CPU) or NCCL (one GPU per rank), two ways, each in fresh processes:
moe_dist's start-up (meta device, parallelize, materialise only the local shards) and, for contrast, the
whole model built on every rank and then sharded. The bound the start-up path promises is a rank's shards
plus the largest single parameter (the one full tensor it holds at a time). On CPU the peak is the
resident set's high-water mark (VmHWM, reset through /proc/self/clear_refs after a warm-up build of the
tiny config has loaded every code path); on CUDA it is torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch

from benchmarks.common import environment, markdown_table, parser, setup, spawn_ranks, status_kib, write_results
from moe_dist.config import load_config
from moe_dist.model import Transformer
from moe_dist.parallel import local_part, parallelize
from moe_dist.parallel.mesh import Runtime, build_mesh
from moe_dist.train import build_model

MIB = 2**20


def reset_peak(device: torch.device) -> int:
    """Start a new high-water mark at the current use; returns the current use in bytes."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset VmHWM to VmRSS
    return status_kib("VmRSS") * 1024


def peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return status_kib("VmHWM") * 1024


def whole_then_shard(cfg, mesh, runtime: Runtime) -> torch.nn.Module:
    """Every rank builds and initialises the whole model, then shards it."""
    with runtime.device:
        model = Transformer(cfg.model, cfg.moe, seed=cfg.train.seed)
    parallelize(model, cfg.parallel, mesh, runtime.device)
    return model


STARTUPS = {"meta, parallelize, materialise shards (moe_dist)": build_model,
            "whole model, then shard": whole_then_shard}


def model_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(this rank's shards of the parameters, plus the buffers; the largest parameter's full size), in bytes."""
    params = list(model.parameters())
    shard_bytes = sum(local_part(p).nbytes for p in params) + sum(b.nbytes for b in model.buffers())
    return shard_bytes, max(p.numel() * p.element_size() for p in params)


def measure(rank: int, world: int, device: torch.device, config: str, startup: str) -> list[float]:
    """[peak growth, shard bytes, largest parameter] of one rank's start-up."""
    runtime = Runtime(rank, world, rank, device)
    build = STARTUPS[startup]
    warm_cfg = load_config("tiny")
    build(warm_cfg, build_mesh(warm_cfg, world, device.type), runtime)  # loads every code path, then freed
    cfg = load_config(config)
    mesh = build_mesh(cfg, world, device.type)
    before = reset_peak(device)
    model = build(cfg, mesh, runtime)
    grown = peak(device) - before
    return [grown, *model_bytes(model)]


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--config", default="small")
    p.add_argument("--world", type=int, default=4)
    args = p.parse_args(argv)
    device = setup(args)
    if device.type == "cuda" and torch.cuda.device_count() < args.world:
        print(f"startup_memory: {torch.cuda.device_count()} GPU(s), fewer than --world {args.world}; skipped")
        return 0
    rows, results = [], {}
    for startup in STARTUPS:
        per_rank = spawn_ranks(measure, args.world, device.type, args.config, startup)
        results[startup] = [{"peak_growth": g, "shard_bytes": s, "largest_param": big} for g, s, big in per_rank]
        g, s, big = max(per_rank, key=lambda r: r[0] / (r[1] + r[2]))
        rows.append([startup, f"{g / MIB:.0f}", f"{s / MIB:.0f}", f"{big / MIB:.0f}", f"{g / (s + big):.2f}"])
    print(f"## Start-up memory: {args.config} config, world {args.world}, {environment(device)['device']}\n")
    print("The rank with the highest peak over its bound; MiB.\n")
    print(markdown_table(["start-up", "peak growth", "own shards", "largest parameter",
                          "peak / (shards + largest)"], rows))
    write_results("startup_memory", {**environment(device), "config": args.config, "world": args.world,
                                     "per_rank": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
