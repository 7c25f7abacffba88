"""Wall time of one training step with expert parallelism against without, same global batch, one run.

    python -m benchmarks.ep_step [--world 4] [--config tiny] [--steps 10]

Spawns `world` gloo ranks on CPU (NCCL on GPUs); each builds the model at ep = 1, then at ep = world
with each `parallel.ep_chunks` in turn, and times the same steps on the same tokens. Exposed
communication is the time the exchange spends blocked on its all-to-alls; the fraction hidden is
1 - exposed / exposed unchunked (c = 1, where only the shared expert, if any, overlaps them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.common import BlockedWaits, init_rank, spawn

from moe_dist.config import load_config
from moe_dist.optim import build_optimizer, build_scheduler
from moe_dist.parallel.mesh import Runtime, build_mesh
from moe_dist.train import build_model, train_step

RESULTS = Path(__file__).resolve().parent / "results"
CHUNKS = (1, 2, 4)


def time_steps(rank: int, world: int, config: str, ep: int, chunks: int, steps: int,
               device: torch.device) -> tuple[list[float], list[float]]:
    """Seconds per step and seconds blocked on the exchange's all-to-alls per step, after two warm-up steps."""
    cfg = load_config(config, {"parallel.ep": ep, "parallel.ep_chunks": chunks})
    model = build_model(cfg, build_mesh(cfg, world, device.type), Runtime(rank, world, rank, device))
    optimizer = build_optimizer(model, cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.optim, steps + 2)
    gen = torch.Generator().manual_seed(rank)
    times, blocked = [], []
    for i in range(steps + 2):  # two warm-up steps
        windows = torch.randint(0, cfg.model.vocab_size, (cfg.data.micro_batch, cfg.data.seq_len + 1), generator=gen)
        batch = (windows[:, :-1].to(device), windows[:, 1:].to(device))
        dist.barrier()
        BlockedWaits.seconds = 0.0
        start = time.perf_counter()
        train_step(model, optimizer, scheduler, [batch], cfg.optim.grad_clip)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        if i >= 2:
            times.append(time.perf_counter() - start)
            blocked.append(BlockedWaits.seconds)
    return times, blocked


def worker(rank: int, world: int, store_dir: str, config: str, steps: int) -> None:
    torch.set_num_threads(1)
    device = init_rank(rank, world, f"{store_dir}/store", "auto").device
    BlockedWaits.install()
    layouts = [(1, 1)] + [(world, c) for c in CHUNKS]
    medians = {}
    for ep, chunks in layouts:
        times, blocked = time_steps(rank, world, config, ep, chunks, steps, device)
        medians[ep, chunks] = statistics.median(times), statistics.median(blocked)
    # Every rank's figures: the step waits for the slowest rank.
    figures = torch.tensor([medians[layout] for layout in layouts], dtype=torch.float64, device=device)
    dist.all_reduce(figures, op=dist.ReduceOp.MAX)
    medians = dict(zip(layouts, figures.tolist()))
    if rank == 0:
        cfg = load_config(config)
        tokens = world * cfg.data.micro_batch * cfg.data.seq_len
        base, exposed_unchunked = medians[1, 1][0], medians[world, 1][1]
        rows = [{"ep": ep, "dp_shard": world // ep, "ep_chunks": chunks, "step_ms": 1e3 * t, "tokens_per_s": tokens / t,
                 "time_vs_ep1": t / base, "blocked_ms": 1e3 * b,
                 "hidden": (1 - b / exposed_unchunked) if ep > 1 and exposed_unchunked > 0 else None}
                for (ep, chunks), (t, b) in medians.items()]
        print(f"| config {config}, world {world}, {device.type}, global batch {tokens} tokens | | | | | | |")
        print("| ep | dp_shard | ep_chunks | step (ms, median) | time vs ep=1 | blocked on all-to-all (ms) "
              "| comm hidden vs c=1 |\n|---|---|---|---|---|---|---|")
        for r in rows:
            hidden = "" if r["hidden"] is None else f"{r['hidden']:.0%}"
            print(f"| {r['ep']} | {r['dp_shard']} | {r['ep_chunks'] if r['ep'] > 1 else ''} | {r['step_ms']:.1f} "
                  f"| {r['time_vs_ep1']:.2f}x | {r['blocked_ms']:.1f} | {hidden} |")
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "ep_step.json").write_text(json.dumps(
            {"config": config, "world": world, "device": device.type, "torch": torch.__version__,
             "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as store_dir:
        spawn(worker, (args.world, store_dir, args.config, args.steps), args.world)


if __name__ == "__main__":
    main()
