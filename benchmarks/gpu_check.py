"""python -m benchmarks.gpu_check (`make gpu-check`): the CUDA path in one command, a few minutes on one GPU.

1. The routing kernels' parity with the per-expert loop on CUDA, fp32 and bf16 (output and all gradients), and
   each backend on a chunk of zero rows.
2. The grouped-GEMM routing speedup over the loop at E=64 and E=128 (target: >= 5x).
3. One training step of the small config in bf16 with compiled blocks: MFU against the device's bf16 peak
   (target: >= 40%).
4. With two or more GPUs: FSDP2 and EP on NCCL against one GPU on the same global batch (fp32, TF32 off),
   and the EP exchange's round trip and overlap at 1, 2 and 4 chunks (benchmarks/all_to_all.py).
5. Attention with document masks, a sliding window, sinks and GQA: the fused kernel runs it (flex_attention, or
   SDPA with its math kernel disabled), never holds a [B, H, S, S] matrix, and agrees with the CPU path.

Shows the backend `auto` picks on this GPU for bf16 and fp32. Writes gpu_check-<date>.json and gpu_check-latest.md
in benchmarks/results/, again after each section, so that a later section's crash keeps what came before. Without a
CUDA device it says so in one line and exits 0; where a GPU is visible (nvidia-smi, CUDA_VISIBLE_DEVICES) but torch
cannot use it, it says so in one line and exits 1.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks import all_to_all
from benchmarks.common import (RESULTS_DIR, datasheet_peak, environment, init_rank, markdown_table, matmul_flops,
                               spawn, write_results)
from benchmarks.routing import Case, check, make_layer, run_case, working_backends
from benchmarks.train_step import Run, run_config
from kernels.grouped_mm import grouped_swiglu, select_backend
from moe_dist.config import load_config
from moe_dist.model.masks import AttentionMask, attend, attention_kernel
from moe_dist.optim import build_optimizer, build_scheduler
from moe_dist.parallel.mesh import build_mesh, exit_process
from moe_dist.train import build_model, train_step

SPEEDUP_TARGET = 5.0
MFU_TARGET = 0.40
EQUIVALENCE_STEPS = 3
EQUIVALENCE_RTOL = 1e-4
ATTENTION_RTOL = 2e-2  # bf16 on the GPU against fp32 on the CPU, relative to each tensor's largest entry
# case: (documents, sliding window, sinks, key/value heads of the 8, q and k head size, v head size)
ATTENTION_CASES = {"gqa causal": (False, 0, False, 2, 64, 64), "documents": (True, 0, False, 2, 64, 64),
                   "sliding window": (False, 256, False, 2, 64, 64), "sinks": (False, 0, True, 2, 64, 64),
                   "all": (True, 256, True, 2, 64, 64), "mla causal": (False, 0, False, 8, 192, 128),
                   "mla documents": (True, 0, False, 8, 192, 128)}


def kernel_parity(device: torch.device) -> list[list]:
    """[dtype, E, backend, worst relative error] for each backend that runs; raises past the tolerance."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for experts in (8, 64, 128):
            layer = make_layer(Case(4096, experts, 2, 512, 1024), device, dtype)
            for backend, error in check(layer, working_backends(layer)).items():
                rows.append([str(dtype).removeprefix("torch."), experts, backend, f"{error:.1e}"])
    return rows + empty_chunk(device)


def empty_chunk(device: torch.device) -> list[list]:
    """[dtype, E, backend, result]: the experts on a chunk that received no rows, forward and backward (expert
    parallelism in chunks makes these common); the weight gradients must be zero."""
    rows = []
    weights = [torch.randn(4, *shape, device=device, dtype=torch.bfloat16, requires_grad=True)
               for shape in ((512, 1024), (512, 1024), (1024, 512))]
    x = torch.empty(0, 512, device=device, dtype=torch.bfloat16, requires_grad=True)
    counts = torch.zeros(4, dtype=torch.int64, device=device)
    for backend in working_backends(make_layer(Case(64, 4, 1, 512, 1024), device, torch.bfloat16)):
        out = grouped_swiglu(x, *weights, counts, backend)
        grads = torch.autograd.grad(out, [x, *weights], torch.zeros_like(out))
        ok = out.shape == (0, 512) and all(g is not None and not g.any() for g in grads[1:])
        rows.append(["bfloat16, 0 rows", 4, backend, "ok" if ok else "DIFFERS"])
    return rows


def auto_backends(device: torch.device) -> list[list]:
    """[dtype, compute capability, backend]: what `auto` runs the experts with on this GPU (torch._grouped_mm has a
    fast kernel only for bf16 on sm90 and sm100)."""
    major, minor = torch.cuda.get_device_capability(device)
    rows = []
    counts = torch.full((4,), 16, device=device)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.zeros(64, 512, device=device, dtype=dtype)
        weights = [torch.zeros(4, *shape, device=device, dtype=dtype)
                   for shape in ((512, 1024), (512, 1024), (1024, 512))]
        backend = select_backend(x, *weights, counts=counts)
        rows.append([str(dtype).removeprefix("torch."), f"sm{major}{minor}", backend])
    return rows


def routing_speedups(device: torch.device) -> list[dict]:
    """fwd+bwd speedup of the batched layer (auto backend) over the loop, bf16, the small config's widths."""
    results = []
    for experts in (64, 128):
        fwd_bwd = run_case(Case(8192, experts, 2, 512, 1024), device, torch.bfloat16, repeats=10, budget_s=5.0)[-1]
        results.append({"experts": experts, "backend": fwd_bwd["auto_backend"],
                        "speedup": fwd_bwd["speedup"][fwd_bwd["auto_backend"]]})
    return results


def train_step_mfu(device: torch.device) -> dict:
    """The small config, bf16 parameters (the CUDA default), compiled blocks, one process."""
    peak = datasheet_peak(device) or matmul_flops(device, torch.bfloat16)
    try:
        _, result = run_config(Run("small", steps=10), device, compile_blocks=True)
    finally:
        dist.destroy_process_group()  # run_config's one-rank group; the NCCL checks start their own
    return {**result, "peak_flops": peak, "mfu": result["tokens_per_s"] * result["flops_per_token"] / peak}


def attention_pass(inputs: list[torch.Tensor], segments: torch.Tensor | None, window: int,
                   device: torch.device) -> tuple[str, list[torch.Tensor], int]:
    """attend() forward and backward on `device` -> (its kernel, [output, gradients of q, k, v (, sinks)], the
    peak bytes it allocated beyond its inputs); on CUDA with SDPA's math kernel disabled."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v, out_grad, *sinks = (t.to(device, dtype) for t in inputs)
    leaves = [t.requires_grad_() for t in (q, k, v, *sinks)]
    mask = AttentionMask(q.shape[2], segments=None if segments is None else segments.to(device), device=device)
    kernel = attention_kernel(mask, window, bool(sinks), (q, k, v))
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    with sdpa_kernel(fused) if device.type == "cuda" else nullcontext():
        out = attend(q, k, v, mask, window, sinks[0] if sinks else None)
        grads = torch.autograd.grad(out, leaves, out_grad)
    peak = torch.cuda.max_memory_allocated() - before if device.type == "cuda" else 0
    return kernel, [t.float().cpu() for t in (out, *grads)], peak


def attention_kernels(device: torch.device) -> list[list]:
    """[case, kernel, peak MiB against one [B, H, S, S] bf16 matrix, worst relative error against the CPU path,
    ok | DIFFERS]: DIFFERS where SDPA's math kernel was needed, the peak reached such a matrix, or the error is
    past ATTENTION_RTOL."""
    batch, heads, seq = 2, 8, 1024
    scores_bytes = batch * heads * seq * seq * 2
    rows = []
    for case, (documents, window, sinks, kv_heads, qk_dim, v_dim) in ATTENTION_CASES.items():
        g = torch.Generator().manual_seed(0)
        inputs = [torch.randn(batch, h, seq, dim, generator=g)
                  for h, dim in ((heads, qk_dim), (kv_heads, qk_dim), (kv_heads, v_dim), (heads, v_dim))]
        inputs = [t.bfloat16().float() for t in inputs]  # the values both devices see exactly
        if sinks:
            inputs.append(torch.randn(heads, generator=g).bfloat16().float())
        segments = (torch.arange(seq) * 3 // seq).expand(batch, seq) if documents else None  # 3 documents
        try:
            kernel, got, peak = attention_pass(inputs, segments, window, device)
        except RuntimeError as e:  # no fused SDPA kernel took it
            rows.append([case, f"error: {' '.join(str(e).split())[:80]}", "-", "-", "DIFFERS"])
            continue
        _, want, _ = attention_pass(inputs, segments, window, torch.device("cpu"))
        error = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want))
        ok = error <= ATTENTION_RTOL and peak < scores_bytes and kernel in ("flex", "sdpa")
        rows.append([case, kernel, f"{peak / 2**20:.0f} / {scores_bytes / 2**20:.0f}", f"{error:.1e}",
                     "ok" if ok else "DIFFERS"])
    return rows


def equivalence_run(rank: int, world: int, ep: int, store: str, out: str) -> None:
    """EQUIVALENCE_STEPS fp32 steps on this rank's part of fixed global batches; rank 0 writes the results."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    runtime = init_rank(rank, world, store, "cuda")
    try:
        # Two chunks: auto would run these small layers unchunked, and the overlap is what NCCL must get right.
        cfg = load_config("tiny", {"parallel.ep": str(ep), "parallel.ep_chunks": "2", "parallel.param_dtype": "float32",
                                   "moe.top_k": "2"})
        device = runtime.device
        model = build_model(cfg, build_mesh(cfg, world, "cuda"), runtime)
        optimizer = build_optimizer(model, cfg.optim, device)
        scheduler = build_scheduler(optimizer, cfg.optim, EQUIVALENCE_STEPS)
        per_rank = 4 // world
        g = torch.Generator().manual_seed(0)
        steps = []
        for _ in range(EQUIVALENCE_STEPS):
            tokens = torch.randint(cfg.model.vocab_size, (4, 65), generator=g)[rank * per_rank:(rank + 1) * per_rank]
            tokens = tokens.to(device)
            result = train_step(model, optimizer, scheduler, [(tokens[:, :-1], tokens[:, 1:])], cfg.optim.grad_clip)
            steps.append([result.loss, result.grad_norm])
        if rank == 0:
            torch.save(steps, out)
    finally:
        dist.destroy_process_group()


def nccl_equivalence() -> list[list]:
    """[layout, worst relative difference from one GPU] for FSDP2 and EP layouts that the GPUs allow."""
    gpus = torch.cuda.device_count()
    layouts = [(1, 1)] + [(w, ep) for w, ep in ((2, 1), (2, 2), (4, 2), (4, 4)) if w <= gpus]
    runs = {}
    for world, ep in layouts:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "steps.pt")
            spawn(equivalence_run, (world, ep, os.path.join(tmp, "store"), out), world)
            runs[(world, ep)] = torch.load(out)
    reference = runs.pop((1, 1))
    rows = []
    for (world, ep), steps in runs.items():
        worst = max(abs(a - b) / abs(b) for got, want in zip(steps, reference) for a, b in zip(got, want))
        rows.append([f"world {world}, ep {ep}", f"{worst:.1e}", "ok" if worst <= EQUIVALENCE_RTOL else "DIFFERS"])
    return rows


def visible_gpus() -> str | None:
    """What says a GPU is here whether or not torch can use it (nvidia-smi's list, CUDA_VISIBLE_DEVICES), or None."""
    if shutil.which("nvidia-smi"):
        try:  # a broken driver can hang nvidia-smi
            listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
        except subprocess.TimeoutExpired:
            return "nvidia-smi is installed but did not answer in 20 s"
        gpus = [line for line in listed.splitlines() if line.startswith("GPU ")]
        if gpus:
            return f"nvidia-smi lists {len(gpus)} GPU(s)"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if visible.strip() not in ("", "-1", "NoDevFiles"):
        return f"CUDA_VISIBLE_DEVICES={visible}"
    return None


class Report:
    """The markdown report and the JSON results, both rewritten on disk as each section is added: a section that
    crashes (or a machine taken back half-way) leaves every earlier section's results there."""

    def __init__(self, title: str, payload: dict):
        self.lines, self.payload = [title, ""], dict(payload)
        self.stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.path: Path | None = None  # the JSON, once a section is in

    def add(self, key: str, value: object, markdown: str) -> None:
        self.payload[key] = value
        self.lines += [markdown, ""]
        print(markdown + "\n", flush=True)
        self.path = write_results("gpu_check", self.payload, self.stamp)
        (RESULTS_DIR / "gpu_check-latest.md").write_text("\n".join(self.lines))


# (JSON key, what measures it, its markdown)
Section = tuple[str, Callable[[], object], Callable[[object], str]]


def run_sections(report: Report, sections: list[Section]) -> None:
    for key, measure, render in sections:
        value = measure()
        report.add(key, value, render(value))


def speedups_table(speedups: list[dict]) -> str:
    return markdown_table(["routing, bf16, T=8192 k=2 D=512 H=1024, fwd+bwd", "backend", "speedup over the loop",
                           f"target >= {SPEEDUP_TARGET:.0f}x"],
                          [[f"E={r['experts']}", r["backend"], f"{r['speedup']:.1f}x",
                            "met" if r["speedup"] >= SPEEDUP_TARGET else "NOT met"] for r in speedups])


def step_table(step: dict) -> str:
    return markdown_table(["train step, small config, bf16, compiled", "tokens/s", "peak TFLOP/s", "MFU",
                           f"target >= {MFU_TARGET:.0%}"],
                          [["1 GPU", f"{step['tokens_per_s']:.0f}", f"{step['peak_flops'] / 1e12:.0f}",
                            f"{step['mfu']:.1%}", "met" if step["mfu"] >= MFU_TARGET else "NOT met"]])


def equivalence_table(equivalence: list[list]) -> str:
    if not equivalence:
        return "NCCL equivalence: one GPU only, not run."
    return markdown_table([f"NCCL vs one GPU, tiny, fp32, {EQUIVALENCE_STEPS} steps (loss, grad norm)",
                           "worst relative difference", f"<= {EQUIVALENCE_RTOL:.0e}"], equivalence)


def overlap_table(overlap: list[dict]) -> str:
    if not overlap:
        return "EP exchange overlap: needs 2 GPUs, not run."
    # Layer time against one chunk: the hidden fraction, read off blocked waits, needs a host that blocks.
    return markdown_table(["EP exchange, bf16, identity / SwiGLU experts", "pass",
                           *[f"exchange/bare c={c}" for c in all_to_all.CHUNKS],
                           *[f"layer c={c} / c=1" for c in all_to_all.CHUNKS]],
                          [[f"world {r['world']}, {r['tokens']} tokens/rank, D={r['dim']}", p,
                            *[f"{r[p][f'ratio c={c}']:.2f}x" for c in all_to_all.CHUNKS],
                            *[f"{r[p][f'layer ratio c={c}']:.2f}x" for c in all_to_all.CHUNKS]]
                           for r in overlap for p in ("fwd", "fwd+bwd")])


def main(argv: list[str] | None = None) -> int:
    if not torch.cuda.is_available():
        seen = visible_gpus()
        if seen is None:
            print("gpu-check: no CUDA device here (torch.cuda.is_available() is False); nothing to check")
            return 0
        why = ("a CPU build; make install TORCH_INDEX=https://download.pytorch.org/whl/cu128 installs a CUDA one"
               if torch.version.cuda is None else f"is the NVIDIA driver older than CUDA {torch.version.cuda}?")
        print(f"gpu-check: {seen} but torch {torch.__version__} cannot use it (torch.version.cuda = "
              f"{torch.version.cuda}: {why})", file=sys.stderr)
        return 1
    device = torch.device("cuda")
    gpus = torch.cuda.device_count()
    env = environment(device)
    report = Report(f"## gpu-check: {env['device']} x {gpus}, torch {env['torch']}, {env['date']}",
                    {**env, "gpus": gpus})
    run_sections(report, [
        ("parity", lambda: kernel_parity(device),
         lambda parity: "Kernel parity with the per-expert loop (T=4096, k=2, D=512, H=1024; worst relative error of "
                        "the output and five gradients):\n\n"
                        + markdown_table(["dtype", "E", "backend", "error"], parity)),
        ("auto_backends", lambda: auto_backends(device),
         lambda rows: markdown_table(["auto backend for the experts: dtype", "compute capability", "backend"], rows)),
        ("routing_speedups", lambda: routing_speedups(device), speedups_table),
        ("train_step", lambda: train_step_mfu(device), step_table),
        ("equivalence", lambda: nccl_equivalence() if gpus > 1 else [], equivalence_table),
        ("attention", lambda: attention_kernels(device),
         lambda rows: markdown_table(["attention, bf16, B=2 H=8 S=1024, fwd+bwd", "kernel",
                                      "peak MiB / one [B,H,S,S]", "error vs CPU", f"<= {ATTENTION_RTOL:.0e}"], rows)),
        ("overlap", lambda: [all_to_all.run_case(case, device, repeats=10) for case in all_to_all.QUICK
                             if case.world <= gpus], overlap_table),
    ])
    print(f"results: {report.path}")
    failed = any(row[-1] == "DIFFERS" for key in ("equivalence", "parity", "attention") for row in report.payload[key])
    return 1 if failed else 0


if __name__ == "__main__":
    exit_process(main())  # it joined a process group (the training step's)
