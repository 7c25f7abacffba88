"""Muon: every weight after 5 steps at world 2 and 4 (FSDP2, EP, experts cut on any dim) equals one process that
applies torch.optim.Muon matrix by matrix and torch.optim.AdamW to the rest; the plan's balance and bytes."""

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from distributed import run_on_ranks
from equivalence import (assert_layout, assert_runs_match, full_parameters, global_batches, relative_error,
                         small_config, split)
from moe_dist.config import Config
from moe_dist.model import Transformer, hidden_matrices
from moe_dist.optim import build_optimizer, build_scheduler, lr_factor
from moe_dist.optim.adamw import adamw_groups
from moe_dist.optim.muon import LR_SCALING, MuonWithAdamW
from moe_dist.optim.muon_plan import MuonPlan, newton_schulz_flops
from moe_dist.parallel.materialize import plain_name
from moe_dist.parallel.mesh import Runtime, build_mesh
from moe_dist.train import build_model, train_step

STEPS = 5


def as_matrices(t: torch.Tensor) -> list[torch.Tensor]:
    """A 2-D tensor as itself, an [E, a, b] stack as its E matrices (views)."""
    return [t] if t.dim() == 2 else list(t)


class TorchMuon:
    """The reference optimizer and its schedule: torch.optim.Muon on each hidden matrix as a 2-D tensor of its own
    (an [E, a, b] stack as E of them), torch.optim.AdamW on the rest, the lr set from lr_factor every step.

    Newton-Schulz runs in bf16 (torch's), so a gradient element 1e-7 away from the distributed run's that rounds to
    the other bf16 value changes the whole update by about 1e-2 (measured here: 3 of 27 matrices differ by 4e-3
    after one step at world 2, none at world 1, where the gradients are bitwise equal). So with `gradients` (the
    distributed run's, per step) it checks its own gradients against them (rel 1e-5) and then steps with them: the
    weights then compare the optimizers alone."""

    def __init__(self, model: Transformer, cfg: Config, gradients: list[dict] | None = None):
        self.model, self.cfg, self.gradients, self.step_count = model, cfg, gradients, 0
        self.stacks = hidden_matrices(model)
        self.matrices = [[torch.nn.Parameter(m.detach().clone()) for m in as_matrices(p)] for p in self.stacks]
        o = cfg.optim
        self.muon = torch.optim.Muon([m for ms in self.matrices for m in ms], lr=o.lr, weight_decay=o.weight_decay,
                                     momentum=o.momentum, nesterov=True, ns_steps=o.ns_steps, adjust_lr_fn=LR_SCALING)
        chosen = {id(p) for p in self.stacks}
        rest = [p for p in model.parameters() if id(p) not in chosen]
        self.adamw = torch.optim.AdamW(adamw_groups(rest, o), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        self._set_lr()

    @torch.no_grad()
    def step(self):
        if self.gradients is not None:
            for name, p in self.model.named_parameters():
                theirs = self.gradients[self.step_count][name]
                assert relative_error(theirs, p.grad) <= 1e-5, (self.step_count, name)
                p.grad.copy_(theirs)
        for stack, matrices in zip(self.stacks, self.matrices):
            for m, grad in zip(matrices, as_matrices(stack.grad)):
                m.grad = grad.clone()
        self.muon.step()
        for stack, matrices in zip(self.stacks, self.matrices):
            stack.copy_(torch.stack(matrices).view_as(stack))
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True):
        self.adamw.zero_grad(set_to_none)
        for stack in self.stacks:
            stack.grad = None

    def _set_lr(self):
        lr = self.cfg.optim.lr * lr_factor(self.step_count, self.cfg.optim, self.cfg.train.steps)
        for group in self.muon.param_groups + self.adamw.param_groups:
            group["lr"] = lr

    def scheduler_step(self):
        self.step_count += 1
        self._set_lr()


def reference_run(cfg: Config, batches: torch.Tensor, gradients: list[dict]) -> tuple[list, dict]:
    model = Transformer(cfg.model, cfg.moe, seed=cfg.train.seed)
    optimizer = TorchMuon(model, cfg, gradients)
    scheduler = type("Schedule", (), {"step": lambda self: optimizer.scheduler_step()})()
    results = [train_step(model, optimizer, scheduler, [split(b) for b in step], cfg.optim.grad_clip)
               for step in batches]
    return results, full_parameters(model)


def muon_config(experts: int, ep: int) -> Config:
    # Two layers: a dense one and an MoE one hold every kind of hidden matrix.
    return small_config(**{"optim.name": "muon", "moe.num_experts": str(experts), "parallel.ep": str(ep),
                           "train.steps": str(STEPS), "optim.lr": "2e-2", "model.n_layers": "2"})


def distributed_run(rank: int, world_size: int, cfg: Config, batches: torch.Tensor) -> tuple[list, list, dict]:
    """Per-step results, the whole gradients each step's optimizer took, and the final weights."""
    mesh = build_mesh(cfg, world_size, "cpu")
    model = build_model(cfg, mesh, Runtime(rank, world_size, rank, torch.device("cpu")))
    assert_layout(model, mesh["ep"].size())
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    gradients = []
    optimizer.register_step_pre_hook(lambda *_: gradients.append(
        {plain_name(n): p.grad.full_tensor() for n, p in model.named_parameters()}))
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    per_rank = batches.shape[2] // world_size
    results = [train_step(model, optimizer, scheduler, [split(b[rank * per_rank:(rank + 1) * per_rank]) for b in step],
                          cfg.optim.grad_clip) for step in batches]
    return results, gradients, full_parameters(model)


def layouts_worker(rank, world_size, layouts, batches):
    return [distributed_run(rank, world_size, muon_config(experts, ep), batches) for experts, ep in layouts]


# (experts, ep) per world size. FSDP cuts the local experts on dim 0 when they divide over the dp_shard ranks, else on
# the last dim (expert_shard_dim): 3 experts over 2 ranks and 3 local experts (6 over ep 2) over 2 are cut on dim 2.
LAYOUTS = {2: [(3, 1), (4, 2)], 4: [(6, 2), (4, 4)]}


@pytest.mark.parametrize("world_size", [2, 4])
def test_five_steps_equal_torch_muon_matrix_by_matrix(world_size):
    batches = global_batches(muon_config(4, 1), STEPS, world_size)
    per_layout = run_on_ranks(layouts_worker, world_size, LAYOUTS[world_size], batches)
    for i, (experts, ep) in enumerate(LAYOUTS[world_size]):
        runs = [layouts[i] for layouts in per_layout]
        expected = reference_run(muon_config(experts, ep), batches, gradients=runs[0][1])
        assert_runs_match([(results, weights) for results, _, weights in runs], expected, rtol=1e-5)


# Parameters cut as FSDP2 never cuts them here (an expert stack on dim 1, a matrix on its columns, uneven pieces and
# empty ones) over a 2 x 2 mesh: the plan takes any sharded placement.
PLACED = [((3, 10, 7), (Shard(1), Shard(2))), ((5, 6, 9), (Shard(0), Shard(1))), ((10, 7), (Shard(1), Shard(0))),
          ((2, 3, 5), (Shard(2), Shard(0)))]


def placed_worker(rank, world_size, steps):
    mesh = init_device_mesh("cpu", (2, 2))
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(shape, generator=gen) for shape, _ in PLACED]
    params = [torch.nn.Parameter(distribute_tensor(t, mesh, placements)) for t, (_, placements) in zip(full, PLACED)]
    cfg = muon_config(4, 1).optim
    optimizer = MuonWithAdamW(params, adamw_groups([], cfg), cfg, fused=False)
    # Buckets of at most 100 elements: the shared matrices travel in several pairs of all-to-alls.
    optimizer.plan = MuonPlan(params, rank, world_size, cfg.ns_steps, bucket_numel=100)
    assert len(optimizer.plan.buckets) > 2
    moved = []
    send = torch.distributed.all_to_all_single
    torch.distributed.all_to_all_single = lambda out, inp, out_sizes, in_sizes, **kw: (
        moved.append(sum(n for r, n in enumerate(in_sizes) if r != rank)), send(out, inp, out_sizes, in_sizes, **kw))
    try:
        for _ in range(steps):
            for p, (_, placements) in zip(params, PLACED):
                p.grad = distribute_tensor(torch.randn(p.shape, generator=gen), mesh, placements)
            optimizer.step()
    finally:
        torch.distributed.all_to_all_single = send
    plan = optimizer.plan
    return ([p.full_tensor() for p in params], sum(moved) // steps, plan.bytes_sent(rank),
            [plan.flops(r) for r in range(world_size)])


def test_any_sharded_placement_equals_torch_muon_bit_for_bit():
    steps = 3
    per_rank = run_on_ranks(placed_worker, 4, steps)
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(shape, generator=gen) for shape, _ in PLACED]
    matrices = [[torch.nn.Parameter(m.clone()) for m in as_matrices(t)] for t in full]
    cfg = muon_config(4, 1).optim
    muon = torch.optim.Muon([m for ms in matrices for m in ms], lr=cfg.lr, weight_decay=cfg.weight_decay,
                            momentum=cfg.momentum, nesterov=True, ns_steps=cfg.ns_steps, adjust_lr_fn=LR_SCALING)
    for _ in range(steps):
        grads = [torch.randn(t.shape, generator=gen) for t in full]
        for ms, grad in zip(matrices, grads):
            for m, part in zip(ms, as_matrices(grad)):
                m.grad = part.clone()
        muon.step()
    want = [torch.stack(ms).view(t.shape) for t, ms in zip(full, matrices)]
    flops = [newton_schulz_flops(m.shape, cfg.ns_steps) for ms in matrices for m in ms]
    for rank, (got, moved, planned, per_rank_flops) in enumerate(per_rank):
        for i, (g, w) in enumerate(zip(got, want)):
            assert torch.equal(g, w), (rank, PLACED[i])
        assert moved == planned > 0, rank  # the bytes the all-to-alls carried are the plan's
        assert sum(per_rank_flops) == sum(flops)  # each matrix orthogonalised once in the world
        assert max(per_rank_flops) <= sum(flops) / 4 + max(flops), per_rank_flops  # LPT's bound


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    cfg = small_config(**{"optim.name": "muon", "model.attention": "mla", "model.q_lora_rank": "48",
                          "model.kv_lora_rank": "32", "moe.shared_expert_hidden": "64",
                          "moe.shared_expert_gate": "true", "moe.expert_biases": "true", "moe.router_bias": "true"})
    model = Transformer(cfg.model, cfg.moe)
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    names = {id(p): name for name, p in model.named_parameters()}
    muon, *adamw = ({names[id(p)] for p in group["params"]} for group in optimizer.param_groups)
    assert [g["muon"] for g in optimizer.param_groups] == [True, False, False]
    assert muon | set().union(*adamw) == set(names.values()) and not muon & set().union(*adamw)
    assert {"layers.0.ffn.w2.weight", "layers.1.attention.wq_a.weight", "layers.1.attention.wkv_b.weight",
            "layers.1.attention.wo.weight", "layers.1.ffn.experts.w1", "layers.1.ffn.experts.w2",
            "layers.1.ffn.shared_expert.w3.weight"} <= muon
    assert all(name.startswith("layers.") for name in muon)
    # The router, the shared expert's gate, the embeddings, the head, the experts' [E, hidden] biases: AdamW, with
    # weight decay as AdamW alone gives them (2-D); norms and the other biases without.
    assert {"layers.1.ffn.router.gate.weight", "layers.1.ffn.shared_expert_gate.weight", "tok_embeddings.weight",
            "output.weight", "layers.1.ffn.experts.w1_bias"} <= adamw[0]
    assert {"layers.1.ffn.router.gate.bias", "norm.weight"} <= adamw[1]
