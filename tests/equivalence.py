"""Shared pieces of the distributed-equivalence tests: a small config, global batches, runs."""

from __future__ import annotations

import zlib

import torch
from torch.distributed.tensor import DTensor, Shard

from moe_dist.config import Config, load_config
from moe_dist.model import Transformer, moe_layers
from moe_dist.optim import build_optimizer, build_scheduler
from moe_dist.parallel.expert_parallel import AllToAllExchange
from moe_dist.parallel.fsdp import expert_shard_dim
from moe_dist.parallel.materialize import BlockReader, plain_name
from moe_dist.parallel.mesh import Runtime, build_mesh
from moe_dist.train import build_model, train_step

MICRO_BATCH = 2  # sequences per rank per micro-step


def small_config(**overrides) -> Config:
    base = {"model.dim": "64", "model.n_layers": "3", "model.n_heads": "4", "model.n_kv_heads": "2",
            "model.vocab_size": "256", "model.ffn_hidden": "128", "model.max_seq_len": "32", "data.seq_len": "32",
            "moe.expert_hidden": "64", "parallel.ep": "1", "moe.first_k_dense": "1", "moe.aux_loss_coef": "0.1",
            "optim.warmup_steps": "2", "optim.lr": "1e-2",
            # Auto would run these small layers unchunked: with ep > 1, every equivalence test runs the overlap.
            "parallel.ep_chunks": "2",
            # Adam divides by sqrt(v) + eps: at eps = 1e-8 a gradient element near 1e-8 turns float
            # reduction-order noise into a visible update difference. 1e-4 keeps the comparison about gradients.
            "optim.eps": "1e-4"}
    return load_config("tiny", {**base, **overrides})


def global_batches(cfg: Config, steps: int, world_size: int, seed: int = 7) -> torch.Tensor:
    """[steps, grad_accum, world_size * MICRO_BATCH, seq_len + 1] token windows."""
    gen = torch.Generator().manual_seed(seed)
    shape = (steps, cfg.train.grad_accum, world_size * MICRO_BATCH, cfg.data.seq_len + 1)
    return torch.randint(0, cfg.model.vocab_size, shape, generator=gen)


def split(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return windows[..., :-1], windows[..., 1:]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest difference, relative to the largest value."""
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def train_steps(model, cfg: Config, batches: torch.Tensor, rank: int = 0, ranks: int = 1) -> list:
    """Run the steps on this rank's slice of each global micro-batch; returns per-step results."""
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    per_rank = batches.shape[2] // ranks
    results = []
    for step_batches in batches:
        micro = [split(b[rank * per_rank:(rank + 1) * per_rank]) for b in step_batches]
        results.append(train_step(model, optimizer, scheduler, micro, cfg.optim.grad_clip))
    return results


def full_parameters(model) -> dict[str, torch.Tensor]:
    """Unsharded copies of every parameter and buffer, by their names in the plain model."""
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        t = t.full_tensor() if isinstance(t, DTensor) else t
        out[plain_name(name)] = t.detach().clone()
    return out


def nonzero_biases(cfg: Config) -> BlockReader:
    """The initial values, except that every parameter named "...bias" (the router's, the experts', attention's) is
    drawn Normal(0, 0.1) from a generator seeded by its name: biases at 0 would hide one applied to the wrong
    expert. For build_model's `read`, or `fill` on a plain model."""
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.moe, seed=cfg.train.seed)

    def read(name: str, shape: torch.Size, block: tuple[slice, ...]) -> torch.Tensor:
        if name.endswith("bias"):
            generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            return torch.randn(shape, generator=generator).mul_(0.1)[block]
        return model.initial_value(name, shape, "cpu")[block]

    return read


@torch.no_grad()
def fill(model, read: BlockReader) -> None:
    """Every parameter of a plain (unsharded) model set to what `read` gives."""
    for name, param in model.named_parameters():
        param.copy_(read(name, param.shape, (slice(None),) * param.dim()))


def reference_run(cfg: Config, batches: torch.Tensor) -> tuple[list, dict]:
    """One process, no process group, plain model, the whole global batch."""
    model = Transformer(cfg.model, cfg.moe, seed=cfg.train.seed)
    return train_steps(model, cfg, batches), full_parameters(model)


def assert_layout(model, ep: int) -> None:
    """The model really runs the layout a test claims: with ep > 1, every MoE layer's experts are DTensors
    sharded on dim 0 over a mesh dim "ep" of that size and tokens go through the all-to-all exchange (so
    FSDP alone cannot pass an EP test); with ep = 1, no layer is expert-parallel. FSDP cuts the experts on
    the dim `expert_shard_dim` names."""
    for moe in moe_layers(model):
        assert isinstance(moe.exchange, AllToAllExchange) == (ep > 1), moe.exchange
        for name, w in moe.experts.named_parameters():
            names = w.device_mesh.mesh_dim_names
            if "dp_shard" in names:  # FSDP's cut: the last dim where the local experts do not divide over its ranks
                i = names.index("dp_shard")
                assert w.placements[i].dim == expert_shard_dim(w.shape[0] // ep, w.device_mesh.size(i), w.dim()), name
            if ep == 1:
                assert "ep" not in names or w.device_mesh.size(names.index("ep")) == 1, (name, names)
                continue
            i = names.index("ep")
            assert w.device_mesh.size(i) == ep and w.placements[i] == Shard(0), (name, names, w.placements)


def distributed_run(rank: int, world_size: int, cfg: Config, batches: torch.Tensor) -> tuple[list, dict]:
    runtime = Runtime(rank, world_size, rank, torch.device("cpu"))
    mesh = build_mesh(cfg, world_size, "cpu")
    model = build_model(cfg, mesh, runtime)
    assert_layout(model, mesh["ep"].size())
    return train_steps(model, cfg, batches, rank, world_size), full_parameters(model)


def assert_runs_match(per_rank: list[tuple[list, dict]], expected: tuple[list, dict], rtol: float) -> None:
    """Every rank's run equals the reference: as many steps; loss, aux loss and gradient norm within rtol; expert
    load and dropped pairs exactly; the final weights within rtol."""
    ref_steps, ref_params = expected
    for rank, (steps, params) in enumerate(per_rank):
        assert len(steps) == len(ref_steps), f"rank {rank}: {len(steps)} steps, the reference {len(ref_steps)}"
        for i, (got, want) in enumerate(zip(steps, ref_steps)):
            where = f"rank {rank} step {i + 1}"
            for field in ("loss", "aux_loss", "grad_norm"):
                a, b = getattr(got, field), getattr(want, field)
                assert abs(a - b) <= rtol * abs(b) + 1e-9, (where, field, a, b)
            assert got.skipped == want.skipped, where
            if want.expert_load is not None:
                torch.testing.assert_close(got.expert_load, want.expert_load, rtol=0, atol=0, msg=where)
                torch.testing.assert_close(got.dropped, want.dropped, rtol=0, atol=0, msg=where)
        assert params.keys() == ref_params.keys()
        for name, want in ref_params.items():
            torch.testing.assert_close(params[name], want, rtol=rtol, atol=rtol * want.abs().max().item(),
                                       msg=f"rank {rank} {name}")
