"""The one start-up path (meta device, parallelize, materialise local shards) on CPU, as it runs on GPUs:
bit-identical initial weights at every layout, and bf16 mixed precision under FSDP2 on gloo."""

from __future__ import annotations

import pytest
import torch

from distributed import run_on_ranks
from equivalence import assert_layout, full_parameters, global_batches, small_config, split, train_steps
from moe_dist.config import load_config
from moe_dist.model import Transformer
from moe_dist.parallel.mesh import Runtime, build_mesh
from moe_dist.train import build_model, loss_fn

LAYOUTS = {1: [1], 2: [1, 2], 4: [1, 2, 4]}  # world size: its eps; dp_shard is the rest


def configs(ep: int):
    """The test config (with a shared expert and a dense first layer) and tiny, both with an aux-free bias; where
    ep divides 6, the test config with 6 experts too (at world 4, FSDP cuts those on dim 2)."""
    cfgs = [small_config(**{"moe.shared_expert_hidden": "32", "moe.aux_free_bias": "true", "train.seed": "5"}),
            load_config("tiny", {"moe.aux_free_bias": "true", "parallel.ep": "1"})]
    if 6 % ep == 0:
        cfgs.append(small_config(**{"moe.num_experts": "6", "moe.top_k": "2"}))
    for cfg in cfgs:
        cfg.parallel.ep = ep
    return cfgs


def initial_weights_worker(rank, world_size, cfgs):
    weights = []
    for cfg in cfgs:
        model = build_model(cfg, build_mesh(cfg, world_size, "cpu"), Runtime(rank, world_size, rank,
                                                                             torch.device("cpu")))
        assert_layout(model, cfg.parallel.ep)
        local = {name: p.to_local().numel() for name, p in model.named_parameters()}
        weights.append((full_parameters(model), local))
    return weights


@pytest.mark.slow
@pytest.mark.parametrize("world_size", LAYOUTS)
def test_initial_weights_are_bit_identical_at_every_layout(world_size):
    cfgs = [cfg for ep in LAYOUTS[world_size] for cfg in configs(ep)]
    per_rank = run_on_ranks(initial_weights_worker, world_size, cfgs)
    for c, cfg in enumerate(cfgs):
        reference = full_parameters(Transformer(cfg.model, cfg.moe, seed=cfg.train.seed))
        for rank, weights in enumerate(per_rank):
            got, local = weights[c]
            assert got.keys() == reference.keys()
            for name, want in reference.items():
                assert torch.equal(got[name], want), (cfg.model.dim, world_size, cfg.parallel.ep, rank, name)
            if world_size > 1:  # each rank holds a shard, not the whole model
                assert sum(local.values()) < sum(t.numel() for t in reference.values())


def test_initial_values_depend_on_the_seed_and_the_name_only():
    cfg = small_config()
    a, b = Transformer(cfg.model, cfg.moe, seed=1), Transformer(cfg.model, cfg.moe, seed=1)
    other = Transformer(cfg.model, cfg.moe, seed=2)
    for (name, x), y, z in zip(a.named_parameters(), b.parameters(), other.parameters()):
        assert torch.equal(x, y) and ("norm" in name or not torch.equal(x, z)), name
    wq0, wq1 = a.layers[0].attention.wq.weight, a.layers[1].attention.wq.weight
    assert not torch.equal(wq0, wq1)  # same shape, different names: different draws
    assert abs(wq0.std().item() - cfg.model.init_std) < 0.2 * cfg.model.init_std


# --- bf16 parameters, fp32 reductions (the GPU default) on gloo ------------------------------------------------

BF16 = {"parallel.param_dtype": "bfloat16", "parallel.reduce_dtype": "float32"}
BF16_STEPS = 10


def _build(rank, world_size, cfg):
    return build_model(cfg, build_mesh(cfg, world_size, "cpu"), Runtime(rank, world_size, rank, torch.device("cpu")))


def first_step(rank, world_size, cfg, windows):
    """Loss and full gradients of one forward and backward on this rank's part of `windows`."""
    model = _build(rank, world_size, cfg)
    per_rank = windows.shape[0] // world_size
    inputs, targets = split(windows[rank * per_rank:(rank + 1) * per_rank])
    logits, aux = model(inputs)
    assert logits.dtype == torch.bfloat16
    ce = loss_fn(logits, targets)
    (ce + aux).backward()
    grads = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).float()
             for name, p in model.named_parameters()}
    loss = ce.detach().clone()
    torch.distributed.all_reduce(loss)
    return loss.item() / world_size, grads


def bf16_worker(rank, world_size, cfg, windows, trajectories):
    """One bf16 forward and backward, then the losses of each (config, batches) trajectory."""
    losses = [[step.loss for step in train_steps(_build(rank, world_size, c), c, batches, rank, world_size)]
              for c, batches in trajectories]
    return first_step(rank, world_size, cfg, windows), losses


@pytest.mark.slow
def test_bf16_distributed_equals_one_process_and_stays_near_fp32():
    """FSDP2 with bf16 parameters and fp32 reductions (the GPU default) on gloo, world 4 (ep 2 x dp_shard 2).

    Against one process with the same policy, one step: bf16 has 8 bits of mantissa (a relative step of
    2^-8 = 0.4%), and splitting the batch over ranks changes the shapes, hence the rounding, of the bf16
    matmuls. The loss agrees to 2e-3 relative (measured 6e-4) and each gradient to 2e-2 of its largest element,
    1000x looser than the fp32 tests' 1e-5. Against fp32, ten steps on the same batches: the losses stay within
    1% (measured 0.14%)."""
    cfg = small_config(**BF16, **{"parallel.ep": "2"})
    windows = global_batches(cfg, 1, 4)[0, 0]
    steps = {"train.steps": str(BF16_STEPS), "moe.top_k": "2", "parallel.ep": "2"}
    fp32, bf16 = small_config(**steps), small_config(**BF16, **steps)
    batches = global_batches(fp32, BF16_STEPS, 4)
    one_process = small_config(**BF16)
    (one_loss, one_grads), _ = run_on_ranks(bf16_worker, 1, one_process, windows, [])[0]
    for (loss, grads), (fp32_losses, bf16_losses) in run_on_ranks(bf16_worker, 4, cfg, windows,
                                                                  [(fp32, batches), (bf16, batches)]):
        assert abs(loss - one_loss) <= 2e-3 * one_loss, (loss, one_loss)
        for name, want in one_grads.items():
            torch.testing.assert_close(grads[name], want, rtol=0, atol=2e-2 * want.abs().max().item(), msg=name)
        assert len(bf16_losses) == len(fp32_losses) == BF16_STEPS
        for step, (a, b) in enumerate(zip(bf16_losses, fp32_losses), 1):
            assert abs(a - b) <= 0.01 * b, (step, a, b)
