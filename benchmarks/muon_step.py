"""Muon against AdamW: the whole training step and the optimizer step, Newton-Schulz balance, bytes moved.

    python -m benchmarks.muon_step [--world 4] [--config small] [--micro-batch 1] [--seq-len 512] [--steps 3]

Spawns `world` gloo ranks on CPU (NCCL on GPUs); each builds the config's model with AdamW, then with Muon, and
times the same steps on the same tokens: the whole step, and the optimizer's step alone (its step hooks), both the
slowest rank's. Bytes are what the optimizer step's all-to-alls carried to other ranks (counted at the call),
against the ideal: every matrix gathered once to the rank holding most of it and scattered back once. The
Newton-Schulz balance is the plan's at this world and, simulated (fake process group, meta tensors), at 64 ranks.
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

from benchmarks.common import environment, init_rank, spawn, write_results
from moe_dist.config import load_config
from moe_dist.optim import build_optimizer, build_scheduler
from moe_dist.parallel.mesh import Runtime, build_mesh
from moe_dist.simulate import simulate_rank
from moe_dist.train import build_model, train_step

SIMULATED_WORLD = 64


class OptimizerClock:
    """Seconds in optimizer.step and bytes its all-to-alls send to other ranks, by its step hooks."""

    def __init__(self, optimizer: torch.optim.Optimizer, rank: int):
        self.rank, self.seconds, self.bytes, self._start = rank, 0.0, 0, None
        optimizer.register_step_pre_hook(self._pre)
        optimizer.register_step_post_hook(self._post)
        self._send = dist.all_to_all_single

    def _pre(self, *_) -> None:
        dist.all_to_all_single = self._counted
        self._start = time.perf_counter()

    def _post(self, *_) -> None:
        self.seconds += time.perf_counter() - self._start
        dist.all_to_all_single = self._send

    def _counted(self, output, input, output_split_sizes=None, input_split_sizes=None, **kwargs):
        sizes = input_split_sizes or [input.numel() // dist.get_world_size()] * dist.get_world_size()
        self.bytes += input.element_size() * sum(n for r, n in enumerate(sizes) if r != self.rank)
        return self._send(output, input, output_split_sizes, input_split_sizes, **kwargs)


def time_steps(rank: int, world: int, overrides: dict, steps: int, device: torch.device) -> dict:
    """Medians over `steps` steps after one warm-up: whole step and optimizer step (s), optimizer bytes per step."""
    cfg = load_config(overrides.pop("config"), overrides)
    model = build_model(cfg, build_mesh(cfg, world, device.type), Runtime(rank, world, rank, device))
    optimizer = build_optimizer(model, cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.optim, steps + 1)
    clock = OptimizerClock(optimizer, rank)
    gen = torch.Generator().manual_seed(rank)
    whole, optim, sent = [], [], []
    for i in range(steps + 1):
        windows = torch.randint(0, cfg.model.vocab_size, (cfg.data.micro_batch, cfg.data.seq_len + 1), generator=gen)
        batch = (windows[:, :-1].to(device), windows[:, 1:].to(device))
        clock.seconds, clock.bytes = 0.0, 0
        dist.barrier()
        start = time.perf_counter()
        train_step(model, optimizer, scheduler, [batch], cfg.optim.grad_clip)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 1:
            whole.append(time.perf_counter() - start)
            optim.append(clock.seconds)
            sent.append(clock.bytes)
        dist.barrier()
    plan = getattr(optimizer, "plan", None)
    return {"step_s": statistics.median(whole), "optimizer_s": statistics.median(optim),
            "bytes": statistics.median(sent), "ideal_bytes": plan.ideal_bytes() if plan else 0,
            "flops": plan.flops(rank) if plan else 0, "summary": plan.summary() if plan else ""}


def worker(rank: int, world: int, store_dir: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    device = init_rank(rank, world, f"{store_dir}/store", "auto").device
    base = {"config": args.config, "data.micro_batch": args.micro_batch, "data.seq_len": args.seq_len,
            "model.max_seq_len": max(args.seq_len, 1), "parallel.ep": args.ep}
    measured = {name: time_steps(rank, world, {**base, "optim.name": name}, args.steps, device)
                for name in ("adamw", "muon")}
    keys = ("step_s", "optimizer_s", "bytes", "flops")
    figures = torch.tensor([[measured[n][k] for k in keys] for n in measured], dtype=torch.float64)
    gathered = [torch.empty_like(figures) for _ in range(world)]
    dist.all_gather(gathered, figures)
    if rank == 0:
        muon = measured["muon"]
        Path(store_dir, "out.json").write_text(json.dumps(
            {"per_rank": torch.stack(gathered).tolist(), "ideal_bytes": muon["ideal_bytes"], "plan": muon["summary"],
             "environment": environment(device)}))
    dist.destroy_process_group()


def report(args: argparse.Namespace, world: int, out: dict) -> dict:
    """The table on stdout; the figures. out["per_rank"]: [rank][adamw, muon][step_s, optimizer_s, bytes, flops]."""
    per_rank = torch.tensor(out["per_rank"])
    adamw, muon = per_rank.amax(0).tolist()  # the slowest rank's times: every step waits for it
    sent, flops = per_rank[:, 1, 2], per_rank[:, 1, 3]
    simulated = simulate_rank(load_config(args.config, {"optim.name": "muon"}), SIMULATED_WORLD, 0).muon
    rows = {"config": args.config, "world": world, "ep": args.ep, "micro_batch": args.micro_batch,
            "seq_len": args.seq_len, "tokens_per_step": world * args.micro_batch * args.seq_len,
            "adamw_step_s": adamw[0], "muon_step_s": muon[0], "step_ratio": muon[0] / adamw[0],
            "adamw_optimizer_s": adamw[1], "muon_optimizer_s": muon[1],
            "muon_bytes_per_rank_max": sent.max().item(), "muon_bytes_per_rank_mean": sent.mean().item(),
            "muon_bytes_vs_ideal": sent.sum().item() / max(out["ideal_bytes"], 1),
            "ns_flops_max_over_mean": (flops.max() / flops.mean()).item(),
            "plan": out["plan"], f"plan_world_{SIMULATED_WORLD}": simulated}
    print(f"| {args.config}, world {world}, {out['environment']['device_type']}, micro_batch {args.micro_batch} x "
          f"seq_len {args.seq_len} | AdamW | Muon | Muon / AdamW |\n|---|---|---|---|")
    print(f"| training step (s, median, slowest rank) | {adamw[0]:.3f} | {muon[0]:.3f} | {muon[0] / adamw[0]:.2f}x |")
    print(f"| optimizer step (s) | {adamw[1]:.3f} | {muon[1]:.3f} | {muon[1] / adamw[1]:.1f}x |")
    print(f"| optimizer bytes sent per rank (MiB, max / mean) | 0 | {sent.max() / 2**20:.2f} / "
          f"{sent.mean() / 2**20:.2f} | all ranks {rows['muon_bytes_vs_ideal']:.3f}x the ideal |")
    print(f"\n{out['plan']}\n{simulated} (simulated)")
    return {**out["environment"], **rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--ep", type=int, default=0, help="parallel.ep (0 = auto)")
    parser.add_argument("--config", default="small")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as store_dir:
        spawn(worker, (args.world, store_dir, args), args.world)
        out = json.loads(Path(store_dir, "out.json").read_text())
    write_results("muon_step", report(args, args.world, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
