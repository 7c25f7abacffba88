"""python -m benchmarks.all_to_all: the EP exchange's round trip against bare all_to_all_single, and its overlap.

The layer's part of expert parallelism (plan, permute, `AllToAllExchange`, unpermute) runs with
identity experts (rows come back unchanged), so what is timed is routing and communication only:
the plan, the permute and unpermute, the count exchange and its host sync and the all-to-alls. The
reference sends the same rows with the same splits out and back with two bare
`dist.all_to_all_single` calls into preallocated buffers (four for forward + backward).

Then the same layer with real SwiGLU experts (hidden 2D), unchunked and in chunks, beside the experts
alone on the rows this rank receives. The time a rank spends blocked waiting for its all-to-alls is the
communication compute did not hide; the fraction hidden by chunking is 1 - blocked / blocked unchunked.
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
from torch import Tensor
from torch.distributed.device_mesh import init_device_mesh

from benchmarks.common import (BlockedWaits, environment, human, init_rank, markdown_table, parser, setup, spawn,
                               write_results)
from kernels.grouped_mm import grouped_swiglu
from kernels.routing import permute, plan_routing, unpermute
from moe_dist.parallel.expert_parallel import AllToAllExchange

CHUNKS = (1, 2, 4)


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


def random_route(case: Case, rank: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """[T, k] expert ids and combine weights, different on every rank."""
    g = torch.Generator(device=device).manual_seed(rank)
    weights, expert_ids = torch.randn(case.tokens, case.experts, device=device, generator=g).softmax(-1).topk(
        case.top_k, dim=-1)
    return expert_ids, weights


def rank_times(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, float]:
    """Median over repeats of the slowest rank's seconds per call, and of its seconds blocked on the exchange's
    all-to-alls ("<name> blocked"); every call starts after a barrier."""
    for fn in fns.values():
        fn()
    samples = torch.zeros(2, len(fns), repeats, dtype=torch.float64)
    for r in range(repeats):
        for i, fn in enumerate(fns.values()):
            dist.barrier()
            BlockedWaits.seconds = 0.0
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples[0, i, r] = time.perf_counter() - start
            samples[1, i, r] = BlockedWaits.seconds
    samples = samples.to(device)
    dist.all_reduce(samples, op=dist.ReduceOp.MAX)
    times, blocked = (dict(zip(fns, map(statistics.median, s.tolist()))) for s in samples.cpu())
    return times | {f"{name} blocked": seconds for name, seconds in blocked.items()}


def rank_main(rank: int, case: Case, device_type: str, threads: int, repeats: int, store: str, out: str) -> None:
    torch.set_num_threads(threads)
    device = init_rank(rank, case.world, store, device_type).device
    BlockedWaits.install()
    try:
        dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
        mesh = init_device_mesh(device_type, (case.world,), mesh_dim_names=("ep",))
        exchanges = {c: AllToAllExchange(mesh, case.experts, c) for c in CHUNKS}
        expert_ids, weights = random_route(case, rank, device)
        weights = weights.to(dtype)
        tokens = torch.randn(case.tokens, case.dim, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn_like(tokens)
        num_local, hidden = case.experts // case.world, 2 * case.dim
        g = torch.Generator(device=device).manual_seed(100 + rank)
        w1, w3, w2 = (torch.randn(num_local, *shape, device=device, generator=g).div(shape[0] ** 0.5).to(dtype)
                      .requires_grad_() for shape in ((case.dim, hidden), (case.dim, hidden), (hidden, case.dim)))

        def swiglu(rows: Tensor, counts: Tensor) -> Tensor:
            return grouped_swiglu(rows, w1, w3, w2, counts)

        def layer(chunks: int, experts: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
            exchange = exchanges[chunks]
            plan = plan_routing(*exchange.group_of(expert_ids))
            rows, _ = exchange(permute(tokens, plan), plan.counts, experts, None)
            return unpermute(rows, plan, weights)

        # The rows this rank's experts receive, computed once and untimed: the bare reference's splits and
        # the experts-alone input.
        counts = plan_routing(expert_ids, case.experts).counts
        counts_in = torch.empty_like(counts)
        dist.all_to_all_single(counts_in, counts)
        send = counts.view(case.world, -1).sum(1).tolist()
        recv = counts_in.view(case.world, -1).sum(1).tolist()
        rows = torch.randn(sum(send), case.dim, device=device, dtype=dtype)
        received = rows.new_empty(sum(recv), case.dim)
        local_rows = torch.randn(sum(recv), case.dim, device=device, dtype=dtype, requires_grad=True)
        local_counts = counts_in.view(case.world, -1).sum(0)

        def bare_round_trip() -> None:
            dist.all_to_all_single(received, rows, recv, send)
            dist.all_to_all_single(rows, received, send, recv)

        # Where an unchunked round trip's time goes: the plan, the permute, the exchange alone, the unpermute.
        plan = plan_routing(*exchanges[1].group_of(expert_ids))
        grouped = permute(tokens, plan).detach().requires_grad_()
        returned = exchanges[1](grouped, plan.counts, identity_experts, None)[0].detach().requires_grad_()
        grad_grouped = torch.randn_like(grouped)
        parts = {"plan": lambda: plan_routing(*exchanges[1].group_of(expert_ids)),
                 "permute": lambda: permute(tokens, plan),
                 "exchange only": lambda: exchanges[1](grouped, plan.counts, identity_experts, None),
                 "unpermute": lambda: unpermute(returned, plan, weights)}

        fns = {"bare": bare_round_trip, "experts": lambda: swiglu(local_rows, local_counts), **parts}
        fns |= {f"exchange c={c}": (lambda c=c: layer(c, identity_experts)) for c in CHUNKS}
        fns |= {f"layer c={c}": (lambda c=c: layer(c, swiglu)) for c in CHUNKS}
        with torch.no_grad():
            forward = rank_times(fns, device, repeats)
        grad_local = torch.randn_like(local_rows)
        both_fns = {"bare": lambda: (bare_round_trip(), bare_round_trip()),
                    "experts": lambda: torch.autograd.grad(swiglu(local_rows, local_counts),
                                                           (local_rows, w1, w3, w2), grad_local),
                    "plan": parts["plan"],
                    "permute": lambda: torch.autograd.grad(permute(tokens, plan), tokens, grad_grouped),
                    "exchange only": lambda: torch.autograd.grad(
                        exchanges[1](grouped, plan.counts, identity_experts, None)[0], grouped, grad_grouped),
                    "unpermute": lambda: torch.autograd.grad(unpermute(returned, plan, weights), returned, grad)}
        both_fns |= {f"exchange c={c}": (lambda c=c: torch.autograd.grad(layer(c, identity_experts), tokens, grad))
                     for c in CHUNKS}
        both_fns |= {f"layer c={c}": (lambda c=c: torch.autograd.grad(layer(c, swiglu), (tokens, w1, w3, w2), grad))
                     for c in CHUNKS}
        both = rank_times(both_fns, device, repeats)
        for c in CHUNKS:  # identity experts: each token comes back as the sum of its combine weights
            torch.testing.assert_close(layer(c, identity_experts), tokens * weights.sum(-1, keepdim=True),
                                       rtol=2e-2, atol=1e-5)
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
        spawn(rank_main, (case, device.type, threads, repeats, os.path.join(tmp, "store"), out), case.world)
        with open(out) as f:
            timed = json.load(f)
    result = {**asdict(case), "threads_per_rank": threads, "bytes_per_rank": timed["bytes_per_rank"]}
    for pass_name in ("fwd", "fwd+bwd"):
        t = timed[pass_name]
        # On CUDA `wait` only orders streams: nothing blocks, and there is no hidden fraction to read off.
        blocked_unchunked = t["layer c=1 blocked"]
        result[pass_name] = {**t, **{f"ratio c={c}": t[f"exchange c={c}"] / t["bare"] for c in CHUNKS},
                             "exchange only ratio": t["exchange only"] / t["bare"],
                             **{f"layer ratio c={c}": t[f"layer c={c}"] / t["layer c=1"] for c in CHUNKS},
                             **{f"hidden c={c}": 1 - t[f"layer c={c} blocked"] / blocked_unchunked
                                if blocked_unchunked > 0 else None for c in CHUNKS}}
    return result


def percent(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{fraction:.0%}"


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.set_defaults(repeats=10)
    args = p.parse_args(argv)
    device = setup(args)
    env = environment(device)
    backend = "NCCL" if device.type == "cuda" else "gloo"
    cases = FULL if args.full else QUICK
    print(f"## all_to_all: EP exchange round trip vs bare all_to_all_single, and overlap, {backend}, {env['device']}, "
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
             *[f"{r[pass_name][f'ratio c={c}']:.2f}x" for c in CHUNKS], f"{r[pass_name]['experts'] * 1e3:.2f}",
             *[f"{r[pass_name][f'layer c={c}'] * 1e3:.2f}" for c in CHUNKS],
             *[f"{r[pass_name][f'layer c={c} blocked'] * 1e3:.2f}" for c in CHUNKS],
             *[percent(r[pass_name][f"hidden c={c}"]) for c in CHUNKS],
             human(r["tokens"] * r["world"] / r[pass_name]["layer c=1"])]
            for r in results for pass_name in ("fwd", "fwd+bwd")]
    print(markdown_table(["ranks", "tokens/rank", "E", "k", "D", "threads/rank", "MiB sent/rank", "pass", "bare ms",
                          *[f"exchange/bare c={c}" for c in CHUNKS], "experts ms",
                          *[f"layer ms c={c}" for c in CHUNKS], *[f"blocked ms c={c}" for c in CHUNKS],
                          *[f"hidden c={c}" for c in CHUNKS],
                          "tokens/s c=1 (all ranks)"], rows))
    print("\nexchange: plan, permute, all-to-alls, unpermute with identity experts, over the bare all_to_all_single "
          "round trip of the same rows (fwd: 2 calls, fwd+bwd: 4). layer: the same with SwiGLU experts (hidden 2D); "
          "experts: those experts alone on the rows this rank receives. blocked: time the layer spent waiting for its "
          "all-to-alls (communication compute did not hide); hidden: 1 - blocked / blocked at c=1. "
          "c: parallel.ep_chunks. Times: median over repeats of the slowest rank.")
    parts = ("plan", "permute", "exchange only", "unpermute")
    print("\nWhere the unchunked round trip's time goes (ms; exchange only: the all-to-alls, the count exchange and "
          "its host sync, and the buffers they land in):\n")
    print(markdown_table(["ranks", "pass", "bare", *parts, "sum", "exchange c=1", "exchange only / bare"],
                         [[r["world"], pass_name, f"{r[pass_name]['bare'] * 1e3:.2f}",
                           *[f"{r[pass_name][part] * 1e3:.2f}" for part in parts],
                           f"{sum(r[pass_name][part] for part in parts) * 1e3:.2f}",
                           f"{r[pass_name]['exchange c=1'] * 1e3:.2f}", f"{r[pass_name]['exchange only ratio']:.2f}x"]
                          for r in results for pass_name in ("fwd", "fwd+bwd")]))
    for reason in skipped:
        print(f"- skipped {reason}")
    path = write_results("all_to_all", {"benchmark": "all_to_all", **env, "backend": backend, "chunks": list(CHUNKS),
                                        "sweep": "full" if args.full else "quick", "results": results,
                                        "skipped": skipped})
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
