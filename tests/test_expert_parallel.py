"""Expert parallelism on gloo ranks equals one process on the same weights and global batch."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from torch.distributed.device_mesh import init_device_mesh

from distributed import run_on_ranks
from equivalence import (MICRO_BATCH, assert_layout, assert_runs_match, distributed_run, fill, global_batches,
                         nonzero_biases, reference_run, relative_error, small_config, split)
from kernels.grouped_mm import grouped_swiglu
from kernels.routing import permute, plan_routing, unpermute
from moe_dist.config import ConfigError, ParallelConfig
from moe_dist.model import Transformer, moe_layers
from moe_dist.parallel.expert_parallel import AllToAllExchange, auto_chunks
from moe_dist.parallel.materialize import plain_name
from moe_dist.parallel.mesh import Runtime, build_mesh, resolve_mesh
from moe_dist.train import build_model, loss_fn, sum_over_ranks

MESHES = [(2, 2), (4, 2), (4, 4)]  # (world size, ep); dp_shard is the rest
ROUTINGS = [
    {"moe.top_k": "1"},
    {"moe.top_k": "2", "moe.score_func": "sigmoid"},
    {"moe.top_k": "2", "moe.shared_expert_hidden": "32"},
    {"moe.top_k": "2", "skew": True},  # the last two experts get no tokens at all
    {"moe.top_k": "1", "moe.capacity_factor": "0.5"},
    {"moe.top_k": "2", "moe.num_experts": "4"},  # at ep = 4, one expert per rank
    # DeepSeek-V3 routing: groups of 2 experts, the best 2 of 4 groups, scaled weights, sequence-level aux loss
    {"moe.top_k": "2", "moe.score_func": "sigmoid", "moe.n_group": "4", "moe.topk_group": "2",
     "moe.routed_scaling_factor": "2.5", "moe.seq_aux_loss_coef": "0.01"},
    # gpt-oss's expert side (biased router logits, biased experts, a clamped SwiGLU whose limit binds) with
    # DeepSeek-V3's routing and a shared expert; every bias nonzero, the selection bias included
    {"moe.top_k": "2", "moe.router_bias": "true", "moe.expert_biases": "true", "moe.expert_act": "clamped_swiglu",
     "moe.swiglu_limit": "0.2", "moe.score_func": "sigmoid", "moe.aux_free_bias": "true", "moe.n_group": "4",
     "moe.topk_group": "2", "moe.routed_scaling_factor": "2.5", "moe.shared_expert_hidden": "32", "biased": True},
]
FLAGS = ("skew", "biased")  # what a case does to its model beyond its config


def make_case(routing: dict, world_size: int):
    overrides = {k: v for k, v in routing.items() if k not in FLAGS}
    if routing.get("skew"):
        overrides.update({"moe.aux_free_bias": "true", "moe.bias_update_rate": "0"})
    cfg = small_config(**overrides)
    return cfg, {flag: routing.get(flag, False) for flag in FLAGS}, global_batches(cfg, 1, world_size)[0, 0]


def prepare(model, flags: dict) -> None:
    """The selection bias: the last two experts never chosen (skew), or nonzero everywhere (biased)."""
    for moe in moe_layers(model):
        if flags["skew"]:
            moe.router.expert_bias[-2:] = -1e4
        if flags["biased"]:
            generator = torch.Generator().manual_seed(3)
            moe.router.expert_bias.copy_(torch.randn(moe.router.num_experts, generator=generator).mul_(0.03))


def forward_backward(model, inputs, targets) -> dict:
    logits, aux_loss, routing = model(inputs, routing=True)
    ce = loss_fn(logits, targets)
    (ce + aux_loss).backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        grads[plain_name(name)] = g.clone()
    loss = (sum_over_ranks(ce.detach()) / (dist.get_world_size() if dist.is_initialized() else 1)).item()
    return {"logits": logits.detach(), "loss": loss, "aux_loss": aux_loss.item(),
            "grads": grads, "dropped": int(routing.dropped.sum())}


def ep_worker(rank, world_size, ep, cases, chunk_counts):
    """Each case at each parallel.ep_chunks: {chunks: forward_backward results}."""
    results = []
    for cfg, flags, batch in cases:
        by_chunks = {}
        for chunks in chunk_counts:
            cfg.parallel.ep, cfg.parallel.ep_chunks = ep, chunks
            model = build_model(cfg, build_mesh(cfg, world_size, "cpu"),
                                Runtime(rank, world_size, rank, torch.device("cpu")),
                                nonzero_biases(cfg) if flags["biased"] else None)
            assert_layout(model, ep)
            prepare(model, flags)
            local = batch[rank * MICRO_BATCH:(rank + 1) * MICRO_BATCH]
            by_chunks[chunks] = forward_backward(model, *split(local))
        results.append(by_chunks)
    return results


def reference(cfg, flags, batch) -> dict:
    model = Transformer(cfg.model, cfg.moe, seed=cfg.train.seed)
    if flags["biased"]:
        fill(model, nonzero_biases(cfg))
    prepare(model, flags)
    return forward_backward(model, *split(batch))


@pytest.mark.slow
@pytest.mark.parametrize("world_size,ep", MESHES)
def test_forward_and_gradients_match_single_process(world_size, ep):
    """Every routing, unchunked and in 3 chunks (uneven: 64 tokens a rank), against one process; the chunked
    exchange against the unchunked one within 1e-6 of the largest value."""
    cases = [make_case(routing, world_size) for routing in ROUTINGS]
    per_rank = run_on_ranks(ep_worker, world_size, ep, cases, (1, 3))
    for i, case in enumerate(cases):
        want = reference(*case)
        for chunks in (1, 3):
            got = [rank_results[i][chunks] for rank_results in per_rank]
            tol = dict(rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(torch.cat([g["logits"] for g in got]), want["logits"], **tol)
            for g in got:
                assert abs(g["loss"] - want["loss"]) <= 1e-5 * want["loss"]
                assert abs(g["aux_loss"] - want["aux_loss"]) <= 1e-5 * want["aux_loss"]
                for name, grad in want["grads"].items():
                    torch.testing.assert_close(g["grads"][name], grad, rtol=1e-5, atol=1e-5 * grad.abs().max().item(),
                                               msg=lambda m, i=i, name=name: f"{ROUTINGS[i]} {name}: {m}")
            # Capacity drops exactly the pairs that one process drops.
            assert sum(g["dropped"] for g in got) == want["dropped"]
            if "moe.capacity_factor" in ROUTINGS[i]:
                assert want["dropped"] > 0
        for unchunked, chunked in ((r[i][1], r[i][3]) for r in per_rank):
            assert relative_error(chunked["logits"], unchunked["logits"]) <= 1e-6, ROUTINGS[i]
            for name, grad in unchunked["grads"].items():
                assert relative_error(chunked["grads"][name], grad) <= 1e-6, (ROUTINGS[i], name)


class LoggedWork:
    def __init__(self, work, events: list):
        self.work, self.events = work, events

    def wait(self) -> None:
        self.events.append("W")
        self.work.wait()


def exchange_layer(exchange, tokens, expert_ids, weights, compute, alongside=None):
    """The MoE layer's steps around an exchange: plan, permute, exchange, unpermute."""
    plan = plan_routing(*exchange.group_of(expert_ids))
    rows, shared = exchange(permute(tokens, plan), plan.counts, compute, alongside)
    return unpermute(rows, plan, weights), shared


def pipeline_worker(rank, world_size):
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",))
    gen = torch.Generator().manual_seed(rank)
    tokens = torch.randn(64, 8, generator=gen, requires_grad=True)
    weights, expert_ids = torch.randn(64, 4, generator=gen).softmax(-1).topk(2, dim=-1)

    # The order of events at 2 chunks, one expert per rank: S starts an all-to-all, W waits for one, Cc / Bc
    # are chunk c's experts forward / backward, A / a the shared expert forward / backward.
    events = []
    all_to_all_single = dist.all_to_all_single

    def logged_all_to_all(*args, async_op=False, **kwargs):
        work = all_to_all_single(*args, async_op=async_op, **kwargs)
        if not async_op:
            return work
        events.append("S")
        return LoggedWork(work, events)

    def compute(rows, counts):
        chunk = sum(e.startswith("C") for e in events)
        events.append(f"C{chunk}")
        out = rows * 2
        out.register_hook(lambda grad: events.append(f"B{chunk}"))  # runs as the product's backward starts
        return out

    def alongside():
        events.append("A")
        out = tokens * 3
        out.register_hook(lambda grad: events.append("a"))
        return out

    dist.all_to_all_single = logged_all_to_all
    try:
        exchange = AllToAllExchange(mesh, world_size, chunks=2)
        out, shared = exchange_layer(exchange, tokens, expert_ids[:, :1] % world_size, weights[:, :1], compute,
                                     alongside)
        forward = "".join(events)
        events.clear()
        (out.sum() + shared.sum()).backward()
        backward = "".join(events)
    finally:
        dist.all_to_all_single = all_to_all_single

    # Ranks routing different numbers of tokens (10 and 64), in more chunks than tokens (most chunks empty,
    # their all-to-alls of zero rows), against one chunk, with SwiGLU experts: 2 of the 4 experts on each rank.
    num_tokens = 64 if rank else 10
    w1, w3, w2 = (torch.randn(2, *shape, generator=gen, requires_grad=True) for shape in ((8, 16), (8, 16), (16, 8)))
    grad_out = torch.randn(num_tokens, 8, generator=gen)
    results = {}
    for chunks in (1, 70):
        out, _ = exchange_layer(AllToAllExchange(mesh, 4, chunks), tokens[:num_tokens], expert_ids[:num_tokens],
                                weights[:num_tokens], lambda rows, counts: grouped_swiglu(rows, w1, w3, w2, counts))
        results[chunks] = (out.detach(), *torch.autograd.grad(out, (tokens, w1, w3, w2), grad_out))
    return forward, backward, results


def test_exchange_overlaps_chunks_and_mirrors_them_in_backward():
    """Forward: chunk 1 is sent before chunk 0's experts run and chunk 0 comes back while chunk 1's run; the
    shared expert runs while chunk 0 is in flight. Backward runs the same pipeline in reverse. And ranks with
    10 and 64 tokens in 70 chunks (most of them empty) get what one chunk gives."""
    for forward, backward, results in run_on_ranks(pipeline_worker, 2):
        assert forward == "SASWC0SWC1WSW", forward
        assert backward == "SWSB1SWB0SWaW", backward
        for got, want in zip(results[70], results[1]):
            assert relative_error(got, want) <= 1e-6


def test_auto_chunks_by_bytes_on_cpu_and_one_on_gpus():
    """parallel.ep_chunks = 0: the measured CPU rule (one chunk per 2 MiB a rank sends, at most 4); GPUs
    unchunked until measured. The tiny config (512 tokens x k=2 x D=128 x 4 B = 0.5 MiB) runs one chunk."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    mib = 2**20
    assert [auto_chunks(cpu, n * mib) for n in (0, 1, 2, 4, 8, 64)] == [1, 1, 1, 2, 4, 4]
    assert auto_chunks(cpu, 512 * 2 * 128 * 4) == 1
    assert auto_chunks(cuda, 64 * mib) == 1


def trajectory_worker(rank, world_size, cfg, batches):
    return distributed_run(rank, world_size, cfg, batches)


@pytest.mark.slow
@pytest.mark.parametrize("world_size,ep", MESHES)
def test_ten_steps_follow_single_process(world_size, ep):
    cfg = small_config(**{"train.steps": "10", "moe.top_k": "2"})
    batches = global_batches(cfg, 10, world_size)
    cfg.parallel.ep = ep
    got = run_on_ranks(trajectory_worker, world_size, cfg, batches)
    cfg.parallel.ep = 1
    assert_runs_match(got, reference_run(cfg, batches), rtol=1e-4)


@pytest.mark.slow
def test_experts_that_do_not_divide_over_their_shard_ranks():
    """6 experts at ep 2 x dp_shard 2: each EP rank's 3 experts are cut on their last dim by FSDP (dim 2 for the
    weights, 1 for the biases; checked by assert_layout), with gradient clipping on, three steps."""
    cfg = small_config(**{"train.steps": "3", "moe.num_experts": "6", "moe.top_k": "2", "optim.grad_clip": "0.05",
                          "moe.expert_biases": "true"})
    batches = global_batches(cfg, 3, 4)
    cfg.parallel.ep = 2
    got = run_on_ranks(trajectory_worker, 4, cfg, batches)
    cfg.parallel.ep = 1
    want = reference_run(cfg, batches)
    assert all(step.grad_norm > 0.05 for step in want[0])  # clipping really scales the update
    assert_runs_match(got, want, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("ep", [2, 4])
def test_everything_at_once_over_several_steps(ep):
    """Gradient accumulation x activation checkpointing x capacity (tokens dropped) x a learning aux-free bias,
    at world 4 (ep 2 x dp_shard 2, and ep 4), four steps."""
    cfg = small_config(**{"train.steps": "4", "train.grad_accum": "2", "parallel.activation_checkpoint": "true",
                          "moe.capacity_factor": "1.0", "moe.aux_free_bias": "true", "moe.bias_update_rate": "0.01",
                          "moe.top_k": "2"})
    batches = global_batches(cfg, 4, 4)
    cfg.parallel.ep = ep
    got = run_on_ranks(trajectory_worker, 4, cfg, batches)
    cfg.parallel.ep = 1
    want = reference_run(cfg, batches)
    assert all(step.dropped.sum() > 0 for step in want[0])  # capacity really drops tokens
    assert want[1]["layers.1.ffn.router.expert_bias"].abs().sum() > 0  # and the bias really moves
    assert_runs_match(got, want, rtol=1e-4)


def test_bad_mesh_is_refused_before_any_collective():
    with pytest.raises(ConfigError, match="parallel.ep = 3 must divide the world size 4"):
        resolve_mesh(ParallelConfig(ep=3), 6, 4)
    with pytest.raises(ConfigError, match=r"parallel.dp_shard = 3 x parallel.ep = 2 must equal the world size 4"):
        resolve_mesh(ParallelConfig(ep=2, dp_shard=3), 8, 4)
    resolved = resolve_mesh(ParallelConfig(ep=2), 8, 8)
    assert (resolved.dp_shard, resolved.ep) == (4, 2)
    # Auto: ep = gcd(world, experts), dp_shard the rest; every caller resolves through this one function.
    for world, experts, want in ((8, 8, (1, 8)), (12, 8, (3, 4)), (6, 4, (3, 2)), (5, 8, (5, 1))):
        resolved = resolve_mesh(ParallelConfig(ep=0, dp_shard=-1), experts, world)
        assert (resolved.dp_shard, resolved.ep) == want
    with pytest.raises(ConfigError, match="parallel.ep = 3 must divide moe.num_experts = 8"):
        small_config(**{"parallel.ep": "3"})
