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
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import environment, markdown_table, parser, setup, write_results
from moe_dist.config import load_config
from moe_dist.model import Transformer
from moe_dist.parallel import local_part, parallelize
from moe_dist.parallel.mesh import Runtime, build_mesh
from moe_dist.train import build_model

MIB = 2**20


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak(device: torch.device) -> int:
    """Start a new high-water mark at the current use; returns the current use in bytes."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset VmHWM to VmRSS
    return _vm_kib("VmRSS") * 1024


def peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _vm_kib("VmHWM") * 1024


def whole_then_shard(cfg, mesh, runtime: Runtime) -> torch.nn.Module:
    """Every rank builds and initialises the whole model, then shards it."""
    with runtime.device:
        model = Transformer(cfg.model, cfg.moe, seed=cfg.train.seed)
    parallelize(model, cfg.parallel, mesh, runtime.device)
    return model


STARTUPS = {"meta, parallelize, materialise shards (moe_dist)": build_model,
            "whole model, then shard": whole_then_shard}


def rank_main(rank: int, world: int, config: str, startup: str, device_type: str, store: str, out: str) -> None:
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=f"file://{store}",
                            rank=rank, world_size=world)
    runtime = Runtime(rank, world, rank, device)
    try:
        build = STARTUPS[startup]
        warm_cfg = load_config("tiny")
        build(warm_cfg, build_mesh(warm_cfg, world, device_type), runtime)  # loads every code path, then freed
        cfg = load_config(config)
        mesh = build_mesh(cfg, world, device_type)
        before = reset_peak(device)
        model = build(cfg, mesh, runtime)
        grown = peak(device) - before
        params = list(model.parameters())
        shard_bytes = sum(local_part(p).nbytes for p in params)
        shard_bytes += sum(b.nbytes for b in model.buffers())
        largest = max(p.numel() * p.element_size() for p in params)
        result = torch.tensor([grown, shard_bytes, largest], dtype=torch.float64)
        gathered = [torch.empty_like(result) for _ in range(world)]
        dist.all_gather(gathered, result)
        if rank == 0:
            Path(out).write_text(json.dumps([t.tolist() for t in gathered]))
    finally:
        dist.destroy_process_group()


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
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            mp.spawn(rank_main, args=(args.world, args.config, startup, device.type, os.path.join(tmp, "store"),
                                      out), nprocs=args.world)
            per_rank = json.loads(Path(out).read_text())
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
