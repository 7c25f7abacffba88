"""python -m benchmarks.all_to_all: the EP dispatcher's round trip against bare all_to_all_single.

The dispatcher (`moe_dist.parallel.expert_parallel.AllToAllDispatcher`) runs with identity experts
(rows come back unchanged), so what is timed is routing and communication only: the plan, the
permutes, the count exchange and its host sync, two uneven all-to-alls and the regrouping by
local expert. The reference sends the same rows with the same splits out and back with two bare
`dist.all_to_all_single` calls into preallocated buffers (four for forward + backward).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor
from torch.distributed.device_mesh import init_device_mesh

from benchmarks.common import environment, human, markdown_table, parser, setup, write_results
from kernels.routing import plan_routing
from moe_dist.model.router import RouterOutput
from moe_dist.parallel.expert_parallel import AllToAllDispatcher


@dataclass(frozen=True)
class Case:
    world: int
    tokens: int  # per rank
    experts: int
    top_k: int
    dim: int


QUICK = [Case(w, 4096, 8, 2, 256) for w in (2, 4)]
FULL = [Case(w, t, 8, 2, d) for w in (2, 4) for t in (1024, 4096, 16384) for d in (256, 1024)]


def identity_experts(rows: Tensor, counts: Tensor) -> Tensor:
    return rows


def random_route(case: Case, rank: int, device: torch.device, dtype: torch.dtype) -> RouterOutput:
    g = torch.Generator(device=device).manual_seed(rank)
    weights, expert_ids = torch.randn(case.tokens, case.experts, device=device, generator=g).softmax(-1).topk(
        case.top_k, dim=-1)
    zero = torch.zeros((), device=device)
    counts = torch.zeros(case.experts, device=device)
    return RouterOutput(expert_ids, weights.to(dtype), None, zero, zero, zero, counts)


def rank_times(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, float]:
    """Median over repeats of the slowest rank's seconds per call; every call starts after a barrier."""
    for fn in fns.values():
        fn()
    samples = torch.zeros(len(fns), repeats, dtype=torch.float64)
    for r in range(repeats):
        for i, fn in enumerate(fns.values()):
            dist.barrier()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples[i, r] = time.perf_counter() - start
    samples = samples.to(device)
    dist.all_reduce(samples, op=dist.ReduceOp.MAX)
    return {name: statistics.median(row.tolist()) for name, row in zip(fns, samples.cpu())}


def rank_main(rank: int, case: Case, device_type: str, threads: int, repeats: int, store: str, out: str) -> None:
    torch.set_num_threads(threads)
    backend = "nccl" if device_type == "cuda" else "gloo"
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=case.world)
    try:
        dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
        dispatcher = AllToAllDispatcher(init_device_mesh(device_type, (case.world,), mesh_dim_names=("ep",)),
                                        case.experts)
        route = random_route(case, rank, device, dtype)
        tokens = torch.randn(case.tokens, case.dim, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn_like(tokens)

        # The dispatcher's splits, computed once and untimed, for the bare reference.
        counts = plan_routing(route.expert_ids, case.experts).counts
        counts_in = torch.empty_like(counts)
        dist.all_to_all_single(counts_in, counts)
        send = counts.view(case.world, -1).sum(1).tolist()
        recv = counts_in.view(case.world, -1).sum(1).tolist()
        rows = torch.randn(sum(send), case.dim, device=device, dtype=dtype)
        received = rows.new_empty(sum(recv), case.dim)

        def bare_round_trip() -> None:
            dist.all_to_all_single(received, rows, recv, send)
            dist.all_to_all_single(rows, received, send, recv)

        def dispatch() -> Tensor:
            return dispatcher(tokens, route, identity_experts)

        with torch.no_grad():
            forward = rank_times({"dispatcher": dispatch, "bare": bare_round_trip}, device, repeats)
        both = rank_times({"dispatcher": lambda: torch.autograd.grad(dispatch(), tokens, grad),
                           "bare": lambda: (bare_round_trip(), bare_round_trip())}, device, repeats)
        check = dispatch()  # identity experts: each token comes back as the sum of its combine weights
        torch.testing.assert_close(check, tokens * route.weights.sum(-1, keepdim=True), rtol=2e-2, atol=1e-5)
        if rank == 0:
            row_bytes = case.dim * tokens.element_size()
            with open(out, "w") as f:
                json.dump({"fwd": forward, "fwd+bwd": both, "bytes_per_rank": sum(send) * row_bytes}, f)
    finally:
        dist.destroy_process_group()


def run_case(case: Case, device: torch.device, repeats: int) -> dict:
    threads = max(1, torch.get_num_threads() // case.world) if device.type == "cpu" else 1
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(rank_main, args=(case, device.type, threads, repeats, os.path.join(tmp, "store"), out),
                 nprocs=case.world)
        with open(out) as f:
            timed = json.load(f)
    return {**asdict(case), "threads_per_rank": threads, "bytes_per_rank": timed["bytes_per_rank"],
            **{p: {**timed[p], "ratio": timed[p]["dispatcher"] / timed[p]["bare"]} for p in ("fwd", "fwd+bwd")}}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.set_defaults(repeats=10)
    args = p.parse_args(argv)
    device = setup(args)
    env = environment(device)
    backend = "NCCL" if device.type == "cuda" else "gloo"
    cases = FULL if args.full else QUICK
    print(f"## all_to_all: EP dispatcher round trip vs bare all_to_all_single, {backend}, {env['device']}, "
          f"torch {env['torch']}, {'full' if args.full else 'quick'} sweep", flush=True)
    if device.type == "cpu":
        print("NCCL: not run, no CUDA device; the ranks are CPU processes on gloo.")
    print()
    results, skipped = [], []
    for case in cases:
        if device.type == "cuda" and case.world > torch.cuda.device_count():
            skipped.append(f"world {case.world}: needs {case.world} GPUs, {torch.cuda.device_count()} here")
            continue
        results.append(run_case(case, device, args.repeats))
    rows = [[r["world"], r["tokens"], r["experts"], r["top_k"], r["dim"], r["threads_per_rank"],
             f"{r['bytes_per_rank'] / 2**20:.1f}", pass_name, f"{r[pass_name]['bare'] * 1e3:.2f}",
             f"{r[pass_name]['dispatcher'] * 1e3:.2f}", f"{r[pass_name]['ratio']:.2f}×",
             human(r["tokens"] * r["world"] / r[pass_name]["dispatcher"])]
            for r in results for pass_name in ("fwd", "fwd+bwd")]
    print(markdown_table(["ranks", "tokens/rank", "E", "k", "D", "threads/rank", "MiB sent/rank", "pass", "bare ms",
                          "dispatcher ms", "overhead ratio", "tokens/s (all ranks)"], rows))
    print("\nexperts: identity. bare: the same rows and splits out and back (fwd: 2 all_to_all_single, fwd+bwd: 4). "
          "Times: median over repeats of the slowest rank.")
    for reason in skipped:
        print(f"- skipped {reason}")
    path = write_results("all_to_all", {"benchmark": "all_to_all", **env, "backend": backend, "experts": "identity",
                                        "sweep": "full" if args.full else "quick", "results": results,
                                        "skipped": skipped})
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
