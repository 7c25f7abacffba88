"""Shared pieces of the distributed-equivalence tests: a small config, global batches, runs."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from moe_dist.config import Config, load_config
from moe_dist.model import Transformer
from moe_dist.optim import build_optimizer, build_scheduler
from moe_dist.parallel.mesh import Runtime, build_mesh
from moe_dist.train import build_model, train_step

MICRO_BATCH = 2  # sequences per rank per micro-step


def small_config(**overrides) -> Config:
    base = {"model.dim": "64", "model.n_layers": "3", "model.n_heads": "4", "model.n_kv_heads": "2",
            "model.vocab_size": "256", "model.ffn_hidden": "128", "model.max_seq_len": "32", "data.seq_len": "32",
            "moe.expert_hidden": "64", "parallel.ep": "1", "moe.first_k_dense": "1", "moe.aux_loss_coef": "0.1",
            "optim.warmup_steps": "2", "optim.lr": "1e-2",
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
        out[name.replace("_checkpoint_wrapped_module.", "")] = t.detach().clone()
    return out


def reference_run(cfg: Config, batches: torch.Tensor) -> tuple[list, dict]:
    """One process, no process group, plain model, the whole global batch."""
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model, cfg.moe)
    return train_steps(model, cfg, batches), full_parameters(model)


def distributed_run(rank: int, world_size: int, cfg: Config, batches: torch.Tensor) -> tuple[list, dict]:
    runtime = Runtime(rank, world_size, rank, torch.device("cpu"))
    mesh = build_mesh(cfg.parallel, world_size, "cpu")
    model = build_model(cfg, mesh, runtime)
    return train_steps(model, cfg, batches, rank, world_size), full_parameters(model)


def assert_runs_match(actual: tuple[list, dict], expected: tuple[list, dict], rtol: float) -> None:
    (steps, params), (ref_steps, ref_params) = actual, expected
    for got, want in zip(steps, ref_steps):
        assert abs(got.loss - want.loss) <= rtol * abs(want.loss), (got.loss, want.loss)
        assert abs(got.aux_loss - want.aux_loss) <= rtol * abs(want.aux_loss) + 1e-9, (got.aux_loss, want.aux_loss)
        if want.expert_load is not None:
            torch.testing.assert_close(got.expert_load, want.expert_load, rtol=0, atol=0)
    assert params.keys() == ref_params.keys()
    for name, want in ref_params.items():
        torch.testing.assert_close(params[name], want, rtol=rtol, atol=rtol * want.abs().max().item(), msg=name)
