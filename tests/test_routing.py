"""Routing kernels against the seed's per-expert loop, forward and gradients."""

import pytest
import torch
import torch.utils.checkpoint

import kernels.grouped_mm
from kernels.activation import SWIGLU, GatedActivation
from kernels.grouped_mm import (BACKENDS, CPU_MEASURED_ROWS, CPU_PADDED_MAX_ROWS, grouped_mm, grouped_swiglu,
                                select_backend)
from kernels.reference import moe_loop
from kernels.routing import capacity_keep, permute, plan_routing, unpermute
from moe_dist import checkpoint
from moe_dist.config import MoEConfig, load_config
from moe_dist.model.moe import GroupedExperts, MoE

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
@pytest.mark.parametrize("biased", [False, True])
def test_grouped_mm_matches_matmul_per_group(dtype, biased):
    counts = torch.tensor([5, 0, 9, 1, 0, 17])
    x = torch.randn(int(counts.sum()), 8, dtype=dtype, requires_grad=True)
    w = torch.randn(6, 8, 12, dtype=dtype, requires_grad=True)
    bias = torch.randn(6, 12, dtype=dtype, requires_grad=True) if biased else None
    ref = torch.cat([g @ w[e] + (bias[e] if biased else 0) for e, g in enumerate(x.split(counts.tolist()))])
    grad_out = torch.randn_like(ref)
    inputs = (x, w, bias) if biased else (x, w)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out)
    for backend in backends_for(dtype):
        out = grouped_mm(x, w, counts, backend, bias)
        assert_close(out, ref, dtype)
        for g, r in zip(torch.autograd.grad(out, inputs, grad_out), ref_grads):
            assert_close(g, r, dtype)


# gpt-oss's activation with a limit that binds on these inputs (|x w + b| of order 1), so that the clamps' masks
# are tested too.
CLAMPED = GatedActivation("clamped_swiglu", alpha=1.702, limit=0.5)


def make_biases(num_experts, dim, hidden, dtype):
    """(b1 [E, hidden], b3 [E, hidden], b2 [E, dim])."""
    return tuple(torch.randn(num_experts, n, dtype=dtype).mul_(0.5).requires_grad_() for n in (hidden, hidden, dim))


def check_biased_against_loop(dtype, act, skew, backends):
    """Biased experts with `act` on every backend: outputs and every gradient (the biases' included) equal the
    per-expert loop's."""
    (x, weights, w1, w3, w2), expert_ids = make_inputs(37, 8, 2, 16, 24, dtype, skew)
    biases = make_biases(8, 16, 24, dtype)
    ref = moe_loop(x, expert_ids, weights, w1, w3, w2, biases=biases, act=act)
    inputs = (x, weights, w1, w3, w2, *biases)
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out)
    plan = plan_routing(expert_ids, 8)
    for backend in backends:
        rows = grouped_swiglu(permute(x, plan), w1, w3, w2, plan.counts, backend, biases=biases, act=act)
        out = unpermute(rows, plan, weights)
        assert_close(out, ref, dtype)
        for g, r in zip(torch.autograd.grad(out, inputs, grad_out), ref_grads):
            assert_close(g, r, dtype)
    if act is CLAMPED:  # both clamps bind somewhere, and not everywhere
        h1, h3 = x @ w1 + biases[0].unsqueeze(1), x @ w3 + biases[1].unsqueeze(1)
        assert 0.05 < (h1 > act.limit).float().mean() < 0.95 and 0.05 < (h3.abs() > act.limit).float().mean() < 0.95


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", [SWIGLU, CLAMPED])
@pytest.mark.parametrize("skew", [False, True])
def test_biased_experts_match_loop(dtype, act, skew):
    check_biased_against_loop(dtype, act, skew, backends_for(dtype))


@torch.no_grad()
def copy_to_gpt_oss(experts, w1, w3, w2, b1, b3, b2) -> None:
    """Our expert tensors into a GptOssExperts: gate and up interleaved in its gate_up_proj's last dim."""
    experts.gate_up_proj[..., ::2], experts.gate_up_proj[..., 1::2] = w1, w3
    experts.gate_up_proj_bias[:, ::2], experts.gate_up_proj_bias[:, 1::2] = b1, b3
    experts.down_proj.copy_(w2)
    experts.down_proj_bias.copy_(b2)


def test_clamped_experts_match_gpt_oss():
    """GroupedExperts with biases and clamped_swiglu equal transformers' GptOssExperts on the same weights, on every
    backend, forward and every gradient. Its layout: gate_up_proj [E, D, 2H] with the gate in the even columns and
    up in the odd ones (biases likewise), down_proj [E, H, D], applied as x @ W like ours."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    config = transformers.GptOssConfig(hidden_size=16, intermediate_size=24, num_local_experts=8,
                                       num_experts_per_tok=2, swiglu_limit=0.5)
    config._experts_implementation = "eager"
    theirs = GptOssExperts(config)
    (x, weights, w1, w3, w2), expert_ids = make_inputs(37, 8, 2, 16, 24, torch.float32)
    b1, b3, b2 = make_biases(8, 16, 24, torch.float32)
    copy_to_gpt_oss(theirs, w1, w3, w2, b1, b3, b2)
    want = theirs(x, expert_ids, weights)
    grad_out = torch.randn_like(want)
    grads = torch.autograd.grad(want, (x, weights, *theirs.parameters()), grad_out)
    gate_up, gate_up_bias, down, down_bias = grads[2:]
    want_grads = (*grads[:2], gate_up[..., ::2], gate_up[..., 1::2], down,
                  gate_up_bias[:, ::2], gate_up_bias[:, 1::2], down_bias)
    plan = plan_routing(expert_ids, 8)
    for backend in BACKENDS:
        ours = GroupedExperts(8, 16, 24, backend, biases=True,
                              act=GatedActivation("clamped_swiglu", config.swiglu_alpha, config.swiglu_limit))
        assert [(n, tuple(p.shape)) for n, p in ours.named_parameters()] == [
            ("w1", (8, 16, 24)), ("w3", (8, 16, 24)), ("w2", (8, 24, 16)),
            ("w1_bias", (8, 24)), ("w3_bias", (8, 24)), ("w2_bias", (8, 16))]
        with torch.no_grad():
            for p, value in zip(ours.parameters(), (w1, w3, w2, b1, b3, b2)):
                p.copy_(value)
        out = unpermute(ours.compute(permute(x, plan), plan.counts), plan, weights)
        assert_close(out, want, torch.float32)
        for g, r in zip(torch.autograd.grad(out, (x, weights, *ours.parameters()), grad_out), want_grads):
            assert_close(g, r, torch.float32)


def test_moe_layer_is_gpt_oss_mlp():
    """Our MoE layer configured as gpt-oss (router_bias, expert_biases, clamped_swiglu, softmax renormalised over
    the top k) equals transformers' GptOssMLP with the same weights: output and input gradient."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
    config = transformers.GptOssConfig(hidden_size=16, intermediate_size=24, num_local_experts=8,
                                       num_experts_per_tok=2, swiglu_limit=0.5)
    config._experts_implementation = "eager"
    theirs = GptOssMLP(config)
    cfg = MoEConfig(num_experts=8, top_k=2, expert_hidden=24, renormalize=True, router_bias=True, expert_biases=True,
                    expert_act="clamped_swiglu", swiglu_alpha=config.swiglu_alpha, swiglu_limit=0.5)
    ours = MoE(16, cfg)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
        theirs.router.weight.copy_(ours.router.gate.weight)
        theirs.router.bias.copy_(ours.router.gate.bias)
    e = ours.experts
    copy_to_gpt_oss(theirs.experts, e.w1, e.w3, e.w2, e.w1_bias, e.w3_bias, e.w2_bias)
    x = torch.randn(2, 19, 16, requires_grad=True)
    want, got = theirs(x)[0], ours(x)[0]
    assert_close(got, want, torch.float32)
    grad_out = torch.randn_like(want)
    assert_close(*(torch.autograd.grad(out, x, grad_out)[0] for out in (got, want)), torch.float32)


def test_auto_backend_never_loops():
    x, w = torch.randn(4, 8), torch.randn(2, 8, 8)
    assert select_backend(x, w) in ("grouped_mm", "padded")
    assert select_backend(x.double(), w.double()) == "padded"
    assert select_backend(torch.randn(4, 3), torch.randn(2, 3, 3)) == "padded"  # misaligned rows
    for rows in (1, CPU_PADDED_MAX_ROWS, CPU_PADDED_MAX_ROWS + 1, 10_000):
        assert select_backend(x, w, counts=torch.tensor([rows, 0])) in ("grouped_mm", "padded")


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_backend_probe_is_independent_of_grad_mode(mode):
    x, w = torch.randn(4, 8), torch.randn(2, 8, 8)
    expected = select_backend(x, w)
    kernels.grouped_mm._grouped_mm_runs.cache_clear()
    try:
        with mode():  # the first query of the process may come from evaluation or generation
            assert select_backend(x, w) == expected
    finally:
        kernels.grouped_mm._grouped_mm_runs.cache_clear()


def test_backend_probe_inside_a_checkpointed_block():
    """The first query may come from an activation-checkpointed block's forward: the probe must neither add to
    what that block saves (its recomputation, probe cached, would save less) nor move the RNG."""
    experts = GroupedExperts(4, 16, 32)
    torch.nn.init.normal_(experts.w1), torch.nn.init.normal_(experts.w3), torch.nn.init.normal_(experts.w2)
    x, counts = torch.randn(80, 16, requires_grad=True), torch.tensor([10, 30, 0, 40])
    kernels.grouped_mm._grouped_mm_runs.cache_clear()
    try:
        rng = torch.get_rng_state()
        torch.utils.checkpoint.checkpoint(experts.compute, x, counts, use_reentrant=False).sum().backward()
        assert torch.equal(torch.get_rng_state(), rng)
    finally:
        kernels.grouped_mm._grouped_mm_runs.cache_clear()


def test_auto_backend_pads_small_groups_on_cpu():
    x, w = torch.randn(4, 8), torch.randn(2, 8, 8)
    if select_backend(x, w) != "grouped_mm":
        pytest.skip("torch._grouped_mm does not run here")
    assert select_backend(x, w, counts=torch.tensor([CPU_PADDED_MAX_ROWS, 3])) == "padded"
    assert select_backend(x, w, counts=torch.tensor([CPU_PADDED_MAX_ROWS + 1, 3])) == "grouped_mm"


@pytest.fixture
def measured(monkeypatch):
    """`auto` measures even these small shapes, from an empty cache; returns the list of timings it makes."""
    if select_backend(torch.randn(4, 8), torch.randn(2, 8, 8)) != "grouped_mm":
        pytest.skip("torch._grouped_mm does not run here")
    monkeypatch.setattr(kernels.grouped_mm, "MEASURE_MIN_FLOPS", 0)
    monkeypatch.setattr(kernels.grouped_mm, "MEASURED_BACKENDS", {})
    timings, measured_choice = [], kernels.grouped_mm._measured_choice

    def counted(*args):
        timings.append(args)
        return measured_choice(*args)

    monkeypatch.setattr(kernels.grouped_mm, "_measured_choice", counted)
    return timings


def measured_inputs():
    """SwiGLU experts and a routing whose largest group is in the band where `auto` measures."""
    (x, weights, w1, w3, w2), expert_ids = make_inputs(100, 4, 2, 16, 24, torch.float32)
    low, high = CPU_MEASURED_ROWS
    assert low < plan_routing(expert_ids, 4).counts.max() <= high
    return (x, weights, w1, w3, w2), expert_ids


def test_measured_choice_is_cached_per_pass(measured):
    x, w, counts = torch.randn(64, 16), torch.randn(2, 16, 16), torch.tensor([40, 24])
    first = select_backend(x, w, counts=counts)
    assert first in ("grouped_mm", "padded") and len(measured) == 1
    assert select_backend(x, w, counts=counts) == first and len(measured) == 1
    x.requires_grad_()  # forward+backward: a bucket of its own, timed once
    assert select_backend(x, w, counts=counts) in ("grouped_mm", "padded") and len(measured) == 2
    select_backend(x, w, counts=counts)
    assert len(measured) == 2


def scripted_rounds(monkeypatch, rounds: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Replace the timer: round i takes rounds[i] = (grouped_mm seconds, padded seconds); returns the rounds used."""
    used = []

    def time_round(call, order):
        used.append(rounds[len(used)])
        return dict(zip(("grouped_mm", "padded"), used[-1]))

    monkeypatch.setattr(kernels.grouped_mm, "_time_round", time_round)
    return used


def measured_choice_with_padded_rule() -> str:
    counts = torch.tensor([40, 24])
    assert max(counts) <= CPU_PADDED_MAX_ROWS  # the rule says padded
    return select_backend(torch.randn(64, 16), torch.randn(2, 16, 16), counts=counts)


@pytest.mark.parametrize("rounds,expected,used", [
    ([(1, 2)] * 3, "grouped_mm", 3),  # a clear win in every round: overrides the rule's padded
    ([(1.95, 2)] * 3, "padded", 3),  # faster, but not by 5%: the rule stands
    ([(3, 2), (1, 2), (1, 2), (1, 2)], "grouped_mm", 4),  # slower for one round: one more round, then clear
])
def test_measured_choice_overrides_the_rule_on_a_clear_win(measured, monkeypatch, rounds, expected, used):
    taken = scripted_rounds(monkeypatch, rounds)
    assert measured_choice_with_padded_rule() == expected and len(taken) == used


SPIKE = 3.0  # a call slowed by other work on a shared machine


@pytest.mark.parametrize("rounds,expected,used", [
    # grouped_mm truly 25% faster; spikes hit it in two of the first three rounds (a median of three picked padded)
    ([(0.75 * SPIKE, 1), (0.75, SPIKE), (0.75 * SPIKE, 1)] + [(0.75, 1)] * 12, "grouped_mm", 8),
    # grouped_mm truly 30% slower; every other round padded is slowed: noise alternating never flips the rule
    ([(1.3, SPIKE), (1.3, 1)] * 8, "padded", kernels.grouped_mm.MAX_ROUNDS),
    # within the margin in every other round: unclear to the last round, so the rule stands
    ([(0.9, 1), (1.0, 1)] * 8, "padded", kernels.grouped_mm.MAX_ROUNDS),
])
def test_measured_choice_is_robust_to_noise(measured, monkeypatch, rounds, expected, used):
    """Rounds go on until the margin is clear of a minority of slow calls, and the rule stands where it never is."""
    taken = scripted_rounds(monkeypatch, rounds)
    assert measured_choice_with_padded_rule() == expected and len(taken) == used


def test_auto_matches_loop_where_measured(measured):
    check_against_loop(100, 4, 2, torch.float32, "auto")
    assert len(measured) == 1


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_measured_choice_under_no_grad_leaves_the_rng(measured, mode):
    (x, weights, w1, w3, w2), expert_ids = measured_inputs()
    rng = torch.get_rng_state()
    with mode():
        out = batched_moe(x, expert_ids, weights, w1, w3, w2)
    assert len(measured) == 1 and torch.equal(torch.get_rng_state(), rng)
    assert_close(out, moe_loop(x, expert_ids, weights, w1, w3, w2).detach(), torch.float32)


def test_measured_choice_inside_a_checkpointed_block(measured):
    """The timing runs backward in the block's forward: it must not add to what the block saves (its recomputation,
    choice cached, would save less), nor move the RNG, nor touch the caller's gradients."""
    (x, weights, w1, w3, w2), expert_ids = measured_inputs()
    plan = plan_routing(expert_ids, 4)

    def block(x):
        return grouped_swiglu(permute(x, plan), w1, w3, w2, plan.counts)

    rng = torch.get_rng_state()
    out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    grads = torch.autograd.grad(out.sum(), (x, w1, w3, w2))
    assert len(measured) == 1 and torch.equal(torch.get_rng_state(), rng)
    assert all(t.grad is None for t in (x, w1, w3, w2))
    for g, r in zip(grads, torch.autograd.grad(block(x).sum(), (x, w1, w3, w2))):
        assert_close(g, r, torch.float32)


def test_measured_choices_travel_with_a_checkpoint(measured):
    """A resumed process takes the backends the saved one measured rather than timing a near-tie afresh,
    which could pick the other backend and change the numbers in their last bits: resume stays bit-exact."""
    x, w, counts = torch.randn(64, 16), torch.randn(2, 16, 16), torch.tensor([40, 24])
    first = select_backend(x, w, counts=counts)
    state = checkpoint._process_state()
    kernels.grouped_mm.MEASURED_BACKENDS.clear()  # a fresh process
    checkpoint._set_process_state(state)
    assert select_backend(x, w, counts=counts) == first and len(measured) == 1


def test_tiny_config_keeps_the_rule(monkeypatch):
    """A resumed run is a new process that would measure afresh: the tiny config, which test_resume_is_bit_exact
    trains, must not be measured, whatever its routing."""
    monkeypatch.setattr(kernels.grouped_mm, "_measured_choice", lambda *args: pytest.fail("measured"))
    cfg = load_config("tiny")
    e, d, h = cfg.moe.num_experts, cfg.model.dim, cfg.moe.expert_hidden
    rows = cfg.data.micro_batch * cfg.data.seq_len * cfg.moe.top_k
    x = torch.randn(rows, d, requires_grad=True)
    w1, w3, w2 = torch.randn(e, d, h), torch.randn(e, d, h), torch.randn(e, h, d)
    for max_rows in (rows // e, 300, CPU_MEASURED_ROWS[1]):  # from balanced to the top of the band
        counts = torch.full((e,), (rows - max_rows) // (e - 1))
        counts[0] = max_rows
        counts[1] += rows - counts.sum()
        assert counts.max() == max_rows
        assert select_backend(x, w1, w3, w2, counts=counts) == "grouped_mm"  # the rule: groups over 64 rows


@pytest.mark.parametrize("chunk_rows", [1, 5, 16, 1000])
def test_grouped_swiglu_in_chunks_matches_loop(monkeypatch, chunk_rows):
    if select_backend(torch.randn(4, 8), torch.randn(2, 8, 8)) != "grouped_mm":
        pytest.skip("torch._grouped_mm does not run here")
    # fp32 hidden rows of 24: chunk boundaries fall inside groups, groups span chunks, some are empty.
    monkeypatch.setattr(kernels.grouped_mm, "CPU_CHUNK_BYTES", chunk_rows * 24 * 4)
    for skew in (False, True):
        check_against_loop(37, 8, 2, torch.float32, "grouped_mm", skew=skew)
        check_biased_against_loop(torch.float32, CLAMPED, skew, ["grouped_mm"])


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_every_pair_dropped(backend):
    (x, weights, w1, w3, w2), expert_ids = make_inputs(6, 4, 2, 16, 24, torch.float32)
    keep = torch.zeros_like(expert_ids, dtype=torch.bool)
    out = batched_moe(x, expert_ids, weights, w1, w3, w2, keep, backend)
    assert out.shape == x.shape and not out.any()
    grads = torch.autograd.grad(out.sum(), (x, weights))
    assert not any(g.any() for g in grads)


@pytest.mark.parametrize("dropped", [False, True])
def test_unpermute_gradients_one_at_a_time(dropped):
    # Backward reads both gradients off one gather; each must also be right when it is the only one asked for.
    expert_ids = torch.randint(0, 4, (9, 2))
    keep = torch.rand(9, 2) > 0.3 if dropped else None
    plan = plan_routing(expert_ids, 4, keep)
    rows = torch.randn(plan.pair_of_row.numel(), 5, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(9, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda r, w: unpermute(r, plan, w), (rows, weights))
    torch.autograd.gradcheck(lambda r: unpermute(r, plan, weights.detach()), (rows,))
    torch.autograd.gradcheck(lambda w: unpermute(rows.detach(), plan, w), (weights,))


def test_permute_gradient_with_dropped_pairs():
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    expert_ids = torch.randint(0, 3, (7, 2))
    keep = torch.rand(7, 2) > 0.4
    plan = plan_routing(expert_ids, 3, keep)
    torch.autograd.gradcheck(lambda t: permute(t, plan), (x,))
