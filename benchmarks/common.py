"""What the benchmarks share: device and environment, timing, hardware limits, tables, JSON results."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moe_dist.parallel.expert_parallel as expert_parallel
from moe_dist.parallel.mesh import Runtime, exit_process, init_distributed

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Dense bf16 tensor-core peaks from the vendor datasheets (no sparsity), TFLOP/s, by (model, variant): a device name
# ("NVIDIA H200 NVL", "NVIDIA A100-SXM4-80GB") matches its model's word and the variant's, if any, as whole words;
# the SXM part is the model alone. An NVL or PCIe part runs at a lower power limit, and so a lower peak.
DATASHEET_BF16_TFLOPS = {
    ("A100", ""): 312.0,
    ("L40S", ""): 362.05,
    ("H100", ""): 989.4,
    ("H100", "PCIe"): 756.0,
    ("H100", "NVL"): 835.0,
    ("H800", ""): 989.4,
    ("H800", "PCIe"): 756.0,
    ("H200", ""): 989.4,
    ("H200", "NVL"): 835.0,
    ("GH200", ""): 989.4,  # the Grace Hopper superchip's GPU: an H100 / H200 (SXM peak)
    ("B200", ""): 2250.0,
}


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--full", action="store_true", help="the full sweep instead of the quick default subset")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = all cores)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per measurement; the median is reported")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    """Pick the device and fix the CPU thread count for every implementation alike."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but no CUDA device is available")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    return torch.device("cuda") if use_cuda else torch.device("cpu")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores)"


def environment(device: torch.device) -> dict:
    """What every result carries: device, torch version, date, threads."""
    return {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0")}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_times(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                 warmup: int = 1, budget_s: float | None = None) -> dict[str, float]:
    """Median seconds per call of each function, timed as `round_times` does."""
    return {name: statistics.median(s) for name, s in round_times(fns, device, repeats, warmup, budget_s).items()}


def round_times(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                warmup: int = 1, budget_s: float | None = None) -> dict[str, list[float]]:
    """Seconds of each function's call in each round, timed round-robin (each round starting one further
    along) so that noise from other work on a shared machine, and the allocator state a function
    leaves behind, fall on every implementation alike. With `budget_s`, slow functions get fewer
    repeats (at least 3), estimated from the warmup round."""
    start = time.perf_counter()
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    if budget_s is not None and warmup:
        per_round = (time.perf_counter() - start) / warmup
        repeats = max(3, min(repeats, int(budget_s / max(per_round, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn = fns[name]
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - start)
    return samples


def copy_bandwidth(device: torch.device, megabytes: int = 256, repeats: int = 10) -> float:
    """Bytes/s read + written by `dst.copy_(src)` of a large buffer: the device's copy limit."""
    src = torch.ones(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)  # touched by the warmup copy, so no page faults are timed
    seconds = median_times({"copy": lambda: dst.copy_(src)}, device, repeats)["copy"]
    return 2 * src.numel() * src.element_size() / seconds


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of one n x n x n matmul: the measured compute peak."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds = median_times({"mm": lambda: a @ b}, device, repeats)["mm"]
    return 2 * n**3 / seconds


def datasheet_peak(device: torch.device) -> float | None:
    """Dense bf16 FLOP/s from the datasheet for a known GPU, else None."""
    return peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 FLOP/s of the GPU with this name (torch.cuda.get_device_name), None for one not in the table."""
    words = set(re.split(r"[\s_-]+", device_name))
    # The variant named in the device name, else the model's SXM part: "H200 NVL" is not taken for an H200.
    found = [(variant, tflops) for (model, variant), tflops in DATASHEET_BF16_TFLOPS.items()
             if model in words and (variant in words or not variant)]
    return max(found)[1] * 1e12 if found else None


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def status_kib(field: str) -> int:
    """One field of /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile, ...), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


# measure(rank, world, device, *args) -> one row of numbers: what each rank of spawn_ranks reports.
RankMeasure = Callable[..., list[float]]


def init_rank(rank: int, world: int, store: str, device_type: str) -> Runtime:
    """Join the process group of `world` ranks meeting at the file `store`, through the trainer's own start: on
    CUDA NCCL with gloo beside it, which the trainer's reductions of CPU tensors need (NCCL alone refuses them)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    return init_distributed(device_type, init_method=f"file://{store}")


def spawn(fn: Callable[..., None], args: tuple, nprocs: int) -> None:
    """mp.spawn(fn, args, nprocs), each rank leaving as the trainer does (exit_process) once fn has returned."""
    mp.spawn(_run_then_exit, args=(fn, args), nprocs=nprocs)


def _run_then_exit(rank: int, fn: Callable[..., None], args: tuple) -> None:
    fn(rank, *args)  # an exception goes back to mp.spawn, which reports it
    exit_process(0)


def _rank_main(rank: int, world: int, measure: RankMeasure, args: tuple, device_type: str, store: str,
               out: str) -> None:
    torch.set_num_threads(1)
    device = init_rank(rank, world, store, device_type).device
    try:
        result = torch.tensor(measure(rank, world, device, *args), dtype=torch.float64, device=device)
        gathered = [torch.empty_like(result) for _ in range(world)]
        dist.all_gather(gathered, result)
        if rank == 0:
            Path(out).write_text(json.dumps([t.tolist() for t in gathered]))
    finally:
        dist.destroy_process_group()


def spawn_ranks(measure: RankMeasure, world: int, device_type: str, *args) -> list[list[float]]:
    """`measure` on `world` fresh processes (gloo on CPU, NCCL with one GPU per rank, one CPU thread each):
    each rank's row of numbers, in rank order."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        spawn(_rank_main, (world, measure, args, device_type, os.path.join(tmp, "store"), out), world)
        return json.loads(Path(out).read_text())


def write_results(name: str, payload: dict, stamp: str | None = None) -> Path:
    """benchmarks/results/<name>-<stamp>.json (by default the date and time now), and <name>-latest.json beside it."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = stamp or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    text = json.dumps(payload, indent=1)
    path.write_text(text)
    (RESULTS_DIR / f"{name}-latest.json").write_text(text)
    return path


class BlockedWaits:
    """Seconds this process spends blocked on the EP exchange's all-to-alls, once `install`ed: communication
    that compute did not hide. (On CUDA `wait` only orders streams, so it does not measure it there.)"""

    seconds = 0.0

    def __init__(self, work: dist.Work):
        self.work = work

    def wait(self) -> None:
        start = time.perf_counter()
        self.work.wait()
        BlockedWaits.seconds += time.perf_counter() - start

    @staticmethod
    def install() -> None:
        start = expert_parallel._start

        def timed_start(rows: torch.Tensor, splits) -> tuple[torch.Tensor, list]:
            landed, works = start(rows, splits)
            return landed, [BlockedWaits(w) for w in works]

        expert_parallel._start = timed_start
