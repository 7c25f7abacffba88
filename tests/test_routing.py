"""Routing kernels against the seed's per-expert loop, forward and gradients."""

import pytest
import torch

from kernels.grouped_mm import BACKENDS, grouped_mm, grouped_swiglu, select_backend
from kernels.reference import moe_loop
from kernels.routing import permute, plan_routing, unpermute
from moe_dist.model.router import capacity_keep

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def backends_for(dtype):
    # torch._grouped_mm has no float64 kernel; "auto" never picks it there.
    return [b for b in BACKENDS if not (b == "grouped_mm" and dtype == torch.float64)]


def make_inputs(num_tokens, num_experts, top_k, dim, hidden, dtype, skew=False):
    x = torch.randn(num_tokens, dim, dtype=dtype)
    if skew:  # experts >= 2 never chosen
        logits = torch.randn(num_tokens, num_experts)
        logits[:, 2:] -= 100
        expert_ids = logits.topk(top_k, dim=-1).indices
    else:
        expert_ids = torch.rand(num_tokens, num_experts).topk(top_k, dim=-1).indices
    weights = torch.rand(num_tokens, top_k, dtype=dtype)
    w1 = torch.randn(num_experts, dim, hidden, dtype=dtype) / dim**0.5
    w3 = torch.randn(num_experts, dim, hidden, dtype=dtype) / dim**0.5
    w2 = torch.randn(num_experts, hidden, dim, dtype=dtype) / hidden**0.5
    return [t.requires_grad_() for t in (x, weights, w1, w3, w2)], expert_ids


def batched_moe(x, expert_ids, weights, w1, w3, w2, keep=None, backend="auto"):
    plan = plan_routing(expert_ids, w1.shape[0], keep)
    rows = grouped_swiglu(permute(x, plan), w1, w3, w2, plan.counts, backend)
    return unpermute(rows, plan, weights)


def assert_close(actual, expected, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def check_against_loop(num_tokens, num_experts, top_k, dtype, backend, keep_fn=None, skew=False):
    (x, weights, w1, w3, w2), expert_ids = make_inputs(num_tokens, num_experts, top_k, 16, 24, dtype, skew)
    keep = keep_fn(expert_ids) if keep_fn else None
    out = batched_moe(x, expert_ids, weights, w1, w3, w2, keep, backend)
    ref = moe_loop(x, expert_ids, weights, w1, w3, w2, keep)
    assert_close(out, ref, dtype)
    grad_out = torch.randn_like(out)
    inputs = (x, weights, w1, w3, w2)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("num_experts,top_k", [(e, k) for e in (1, 4, 64) for k in (1, 2, 4) if k <= e])
def test_moe_matches_loop(dtype, num_experts, top_k):
    for backend in backends_for(dtype):
        check_against_loop(37, num_experts, top_k, dtype, backend)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_experts_without_tokens(dtype):
    for backend in backends_for(dtype):
        check_against_loop(40, 8, 2, dtype, backend, skew=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_single_token(dtype):
    for backend in backends_for(dtype):
        check_against_loop(1, 4, 2, dtype, backend)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_capacity_drops_match_loop(dtype):
    def keep_fn(expert_ids):
        keep = capacity_keep(expert_ids, seq_len=16, num_experts=4, capacity=3)
        assert not keep.all(), "the example must drop something"
        return keep

    for backend in backends_for(dtype):
        check_against_loop(48, 4, 2, dtype, backend, keep_fn=keep_fn, skew=True)


def test_capacity_keeps_first_pairs_per_sequence_and_expert():
    expert_ids = torch.tensor([[0], [0], [0], [1], [0], [0]])  # two sequences of 3 tokens
    keep = capacity_keep(expert_ids, seq_len=3, num_experts=2, capacity=2)
    assert keep.view(-1).tolist() == [True, True, False, True, True, True]


def test_permute_groups_rows_by_expert_stably():
    x = torch.arange(5, dtype=torch.float64).unsqueeze(1)
    expert_ids = torch.tensor([[2, 0], [1, 2], [0, 1], [2, 0], [1, 1]])
    plan = plan_routing(expert_ids, 3)
    assert plan.counts.tolist() == [3, 4, 3]
    assert permute(x, plan).squeeze(1).tolist() == [0, 2, 3, 1, 2, 4, 4, 0, 1, 3]
    # unpermute(permute(x)) with unit weights sums the k copies of each token.
    torch.testing.assert_close(unpermute(permute(x, plan), plan), 2 * x)


def test_permute_gradient_sums_the_k_copies():
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    expert_ids = torch.randint(0, 4, (6, 2))
    plan = plan_routing(expert_ids, 4)
    grad_rows = torch.randn(12, 3, dtype=torch.float64)
    (grad,) = torch.autograd.grad(permute(x, plan), x, grad_rows)
    (ref,) = torch.autograd.grad(x[plan.token_of_row], x, grad_rows)
    torch.testing.assert_close(grad, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grouped_mm_matches_matmul_per_group(dtype):
    counts = torch.tensor([5, 0, 9, 1, 0, 17])
    x = torch.randn(int(counts.sum()), 8, dtype=dtype, requires_grad=True)
    w = torch.randn(6, 8, 12, dtype=dtype, requires_grad=True)
    ref = torch.cat([g @ w[e] for e, g in enumerate(x.split(counts.tolist()))])
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (x, w), grad_out)
    for backend in backends_for(dtype):
        out = grouped_mm(x, w, counts, backend)
        assert_close(out, ref, dtype)
        for g, r in zip(torch.autograd.grad(out, (x, w), grad_out), ref_grads):
            assert_close(g, r, dtype)


def test_auto_backend_never_loops():
    x, w = torch.randn(4, 8), torch.randn(2, 8, 8)
    assert select_backend(x, w) in ("grouped_mm", "padded")
    assert select_backend(x.double(), w.double()) == "padded"
    assert select_backend(torch.randn(4, 3), torch.randn(2, 3, 3)) == "padded"  # misaligned rows
