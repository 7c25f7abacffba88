"""python -m benchmarks.train_step: training tokens/s and model FLOPs utilisation, tiny and small configs.

One process, the trainer's own code path (`build_model` with FSDP2 on a one-rank mesh, `train_step`,
AdamW, fused on CUDA), synthetic tokens. MFU = tokens/s x `training_flops_per_token` (active
parameters) / peak, the peak being a matmul measured in the same run on CPU (fp32) and the
datasheet's dense bf16 figure on known GPUs. Each config also runs with document masking (packed
documents of seq_len / 4 tokens on average, data.document_mask): its step time over the plain causal
step's, measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist

from benchmarks.common import (datasheet_peak, environment, human, markdown_table, matmul_flops, parser, setup,
                               sync, write_results)
from moe_dist.config import Config, load_config
from moe_dist.data.loader import Batch
from moe_dist.model import moe_layers
from moe_dist.optim import build_optimizer, build_scheduler
from moe_dist.parallel.mesh import build_mesh, exit_process, init_distributed
from moe_dist.params import count_params, training_flops_per_token
from moe_dist.train import build_model, train_step


@dataclass(frozen=True)
class Run:
    config: str
    seq_len: int = 0  # 0 = the config's
    micro_batch: int = 0
    steps: int = 5
    document_mask: bool = False


# On CPU, small runs at a reduced sequence length and batch (from 1024 x 16) to take seconds a step.
CPU_QUICK = [Run("tiny", steps=10), Run("small", seq_len=256, micro_batch=2, steps=3)]
CPU_FULL = [Run("tiny", steps=20), Run("small", seq_len=256, micro_batch=2, steps=5),
            Run("small", seq_len=1024, micro_batch=1, steps=3)]
GPU_RUNS = [Run("tiny", steps=20), Run("small", steps=20)]


def run_config(run: Run, device: torch.device, compile_blocks: bool) -> tuple[Config, dict]:
    overrides = {"data.seq_len": run.seq_len, "data.micro_batch": run.micro_batch}
    cfg = load_config(run.config, {k: v for k, v in overrides.items() if v})
    cfg.train.device = device.type
    cfg.parallel.compile = compile_blocks
    runtime = init_distributed(cfg.train.device)
    model = build_model(cfg, build_mesh(cfg, 1, device.type), runtime)
    optimizer = build_optimizer(model, cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.optim, run.steps + 2)
    d = cfg.data
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(cfg.model.vocab_size, (d.micro_batch, d.seq_len + 1), generator=g).to(device)
    batch = Batch(tokens[:, :-1], tokens[:, 1:])
    if run.document_mask:  # documents starting with probability 4 / seq_len at each token
        starts = torch.rand(d.micro_batch, d.seq_len, generator=g) < 4 / d.seq_len
        batch = batch._replace(segments=torch.cumsum(starts, 1).to(device))
    batch = [batch]
    times = []
    for step in range(run.steps + 2):  # two warmup steps: first-touch allocation, compilation
        sync(device)
        start = time.perf_counter()
        result = train_step(model, optimizer, scheduler, batch, cfg.optim.grad_clip)
        sync(device)
        if step >= 2:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens_per_step = d.micro_batch * d.seq_len
    total, active = count_params(cfg)["total"]
    return cfg, {**asdict(run), "seq_len": d.seq_len, "micro_batch": d.micro_batch,
                 "reduced": bool(run.seq_len or run.micro_batch), "params": total, "active_params": active,
                 "moe_layers": len(moe_layers(model)), "step_s": seconds, "tokens_per_s": tokens_per_step / seconds,
                 "flops_per_token": training_flops_per_token(cfg), "loss": result.loss,
                 "fused_adamw": bool(optimizer.defaults.get("fused"))}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block (parallel.compile)")
    args = p.parse_args(argv)
    device = setup(args)
    env = environment(device)
    plain = GPU_RUNS if device.type == "cuda" else CPU_FULL if args.full else CPU_QUICK
    runs = [r for run in plain for r in (run, replace(run, document_mask=True))]
    peak = datasheet_peak(device)
    peak_source = "datasheet, dense bf16"
    if peak is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        peak = matmul_flops(device, dtype)
        peak_source = f"measured: 2048^3 {str(dtype).removeprefix('torch.')} matmul, this run"
    print(f"## train_step: one process, {env['device']}, torch {env['torch']}, {env['threads']} threads, "
          f"synthetic tokens{', compiled blocks' if args.compile else ''}\n\npeak {peak / 1e12:.3f} TFLOP/s "
          f"({peak_source})", flush=True)
    if device.type == "cpu":
        print("GPU path (bf16 parameters, fused AdamW, datasheet peak): not run, no CUDA device.")
    print()
    results = []
    try:
        for run in runs:
            _, r = run_config(run, device, args.compile)
            r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / peak
            results.append(r)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    rows = [[r["config"] + (" (reduced)" if r["reduced"] else "") + (", document mask" if r["document_mask"] else ""),
             r["seq_len"], r["micro_batch"],
             human(r["params"]), human(r["active_params"]), f"{r['step_s'] * 1e3:.0f}", human(r["tokens_per_s"]),
             human(r["flops_per_token"]), f"{r['mfu']:.1%}"] for r in results]
    print(markdown_table(["config", "seq_len", "micro_batch", "params", "active", "step ms", "tokens/s",
                          "FLOPs/token", "MFU"], rows))
    ratios = [[r["config"], r["seq_len"], r["micro_batch"], f"{m['step_s'] / r['step_s']:.2f}x"]
              for r, m in zip(results[::2], results[1::2])]
    print("\ndocument masking: step time over the causal step's (target: at most 1.3x)\n")
    print(markdown_table(["config", "seq_len", "micro_batch", "masked / causal"], ratios))
    if any(r["reduced"] for r in results):
        print("\n(reduced): seq_len and micro_batch lowered from the config's so that a CPU step takes seconds; "
              "FLOPs/token is counted at the reduced seq_len.")
    path = write_results("train_step", {"benchmark": "train_step", **env, "peak_flops": peak,
                                        "peak_source": peak_source, "compile": args.compile,
                                        "sweep": "full" if args.full else "quick", "results": results})
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    exit_process(main())  # it joined a process group
