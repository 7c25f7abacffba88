"""Router: losses against hand-computed values, weights, aux-free balancing."""

import importlib
import math

import pytest
import torch

from moe_dist.config import MoEConfig
from moe_dist.model.router import Router


def make_router(dim=2, **overrides) -> Router:
    cfg = MoEConfig(num_experts=2, top_k=1, renormalize=False, aux_loss_coef=0.5, z_loss_coef=0.25)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    router = Router(dim=dim, cfg=cfg)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(cfg.num_experts, dim))  # logits = x where dim = num_experts
    return router


def test_load_balance_and_z_loss_hand_computed():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [1.0, 0.5]])
    out = make_router()(x, seq_len=4)
    assert out.expert_ids.view(-1).tolist() == [0, 1, 0, 0]
    # f = fraction of tokens sent to each expert, P = mean softmax probability per expert.
    probs = [[math.exp(a) / (math.exp(a) + math.exp(b)), math.exp(b) / (math.exp(a) + math.exp(b))]
             for a, b in x.tolist()]
    f = [3 / 4, 1 / 4]
    p = [sum(row[i] for row in probs) / 4 for i in range(2)]
    load_balance = 2 * (f[0] * p[0] + f[1] * p[1])
    z = sum(math.log(math.exp(a) + math.exp(b)) ** 2 for a, b in x.tolist()) / 4
    assert math.isclose(out.load_balance_loss.item(), load_balance, rel_tol=1e-6)
    assert math.isclose(out.z_loss.item(), z, rel_tol=1e-6)
    assert math.isclose(out.aux_loss.item(), 0.5 * load_balance + 0.25 * z, rel_tol=1e-6)
    assert out.counts.tolist() == [3.0, 1.0]
    torch.testing.assert_close(out.weights.view(-1), torch.tensor([row[e] for row, e in zip(probs, [0, 1, 0, 0])]))


def test_balanced_routing_gives_unit_load_balance_loss():
    router = make_router(num_experts=4, top_k=2)
    torch.nn.init.zeros_(router.gate.weight)  # uniform probabilities
    x = torch.randn(8, 2)
    out = router(x, seq_len=8)
    # topk of equal scores: counts may be skewed, but P is uniform so the loss is E * sum f_i / E = 1.
    assert math.isclose(out.load_balance_loss.item(), 1.0, rel_tol=1e-6)


def test_sigmoid_scores_renormalised():
    router = make_router(num_experts=4, top_k=2, score_func="sigmoid", renormalize=True)
    out = router(torch.randn(10, 2), seq_len=10)
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(10))


def test_selection_bias_changes_choice_not_weights():
    router = make_router(aux_free_bias=True)
    x = torch.tensor([[1.0, 0.0]])
    before = router(x, seq_len=1)
    router.expert_bias.copy_(torch.tensor([0.0, 1.0]))
    after = router(x, seq_len=1)
    assert before.expert_ids.item() == 0 and after.expert_ids.item() == 1
    expected = 1 / (1 + math.e)  # expert 1's unbiased softmax score
    assert math.isclose(after.weights.item(), expected, rel_tol=1e-6)


def test_aux_free_bias_moves_toward_balance():
    torch.manual_seed(0)
    router = make_router(dim=16, num_experts=8, top_k=2, aux_free_bias=True, bias_update_rate=0.01)
    with torch.no_grad():
        router.gate.weight.normal_()
        router.gate.weight[0] += 0.3  # expert 0 favoured by every token
    x = torch.randn(512, 16).abs()

    def imbalance():
        counts = router(x, seq_len=512).counts
        return (counts.max() / counts.mean()).item(), counts

    start, _ = imbalance()
    for _ in range(300):
        _, counts = imbalance()
        router.update_expert_bias(counts)
    end, _ = imbalance()
    assert start > 1.8
    assert end < 1.4, (start, end)


def test_bias_untouched_without_aux_free():
    router = make_router(aux_free_bias=False)
    router.update_expert_bias(torch.tensor([10.0, 0.0]))
    assert router.expert_bias.abs().sum() == 0


def deepseek_reference(scores, bias, n_group, topk_group, top_k, scale):
    """Group-limited top-k token by token, in plain Python: group score = its two best biased scores."""
    ids, weights = [], []
    for row in scores.tolist():
        biased = [s + b for s, b in zip(row, bias.tolist())]
        size = len(row) // n_group
        group_score = [sum(sorted(biased[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
        groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        allowed = [e for g in groups for e in range(g * size, (g + 1) * size)]
        chosen = sorted(allowed, key=lambda e: -biased[e])[:top_k]
        total = sum(row[e] for e in chosen)
        ids.append(sorted(chosen))
        weights.append({e: scale * row[e] / total for e in chosen})
    return ids, weights


def test_group_limited_routing_and_scaling_match_a_direct_computation():
    torch.manual_seed(0)
    router = make_router(dim=16, num_experts=16, top_k=4, score_func="sigmoid", renormalize=True,
                         aux_free_bias=True, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    torch.nn.init.normal_(router.gate.weight)
    router.expert_bias.copy_(torch.randn(16) * 0.3)
    x = torch.randn(64, 16)
    out = router(x, seq_len=16)
    scores = router.gate(x).sigmoid()
    want_ids, want_weights = deepseek_reference(scores, router.expert_bias, 4, 2, 4, 2.5)
    for t, (got_ids, got_w) in enumerate(zip(out.expert_ids.tolist(), out.weights.tolist())):
        assert sorted(got_ids) == want_ids[t], t
        for e, w in zip(got_ids, got_w):
            assert math.isclose(w, want_weights[t][e], rel_tol=1e-5), (t, e)
        assert len({e // 4 for e in got_ids}) <= 2  # at most topk_group groups
    # The limit really binds: without it some token picks experts from a third group.
    free = make_router(dim=16, num_experts=16, top_k=4, score_func="sigmoid", aux_free_bias=True)
    free.load_state_dict(router.state_dict())
    assert any(len({e // 4 for e in ids}) > 2 for ids in free(x, seq_len=16).expert_ids.tolist())


def test_sequence_level_aux_loss_matches_a_direct_computation():
    torch.manual_seed(1)
    router = make_router(dim=8, num_experts=8, top_k=2, score_func="sigmoid", aux_loss_coef=0.0, z_loss_coef=0.0,
                         seq_aux_loss_coef=0.3)
    torch.nn.init.normal_(router.gate.weight)
    x = torch.randn(3 * 10, 8)  # three sequences of 10 tokens
    out = router(x, seq_len=10)
    scores = router.gate(x).sigmoid()
    probs = scores / scores.sum(-1, keepdim=True)
    per_sequence = []
    for s in range(3):
        ids = out.expert_ids[s * 10:(s + 1) * 10].reshape(-1).tolist()
        f = [8 * ids.count(e) / (2 * 10) for e in range(8)]  # DeepSeek-V3: f_i = E / (k T) * count_i
        p = probs[s * 10:(s + 1) * 10].mean(0).tolist()
        per_sequence.append(sum(fi * pi for fi, pi in zip(f, p)))
    want = 0.3 * sum(per_sequence) / 3
    assert math.isclose(out.aux_loss.item(), want, rel_tol=1e-5)
    # It differs from the batch-level loss, which pools the sequences.
    assert not math.isclose(out.aux_loss.item(), 0.3 * out.load_balance_loss.item(), rel_tol=1e-3)
    out.aux_loss.backward()
    assert router.gate.weight.grad.abs().sum() > 0


# --- against transformers' routers, weights copied ---

def compare_routing(ours, ids, weights, rel: float) -> None:
    """Our RouterOutput chooses the same experts per token (as sets: transformers' top-k may be unsorted) with the
    same weights, each within `rel`."""
    for t, (got_ids, got_w, want_ids, want_w) in enumerate(zip(ours.expert_ids.tolist(), ours.weights.tolist(),
                                                                ids.tolist(), weights.tolist())):
        assert sorted(got_ids) == sorted(want_ids), t
        want = dict(zip(want_ids, want_w))
        for e, w in zip(got_ids, got_w):
            assert math.isclose(w, want[e], rel_tol=rel), (t, e, w, want[e])


def test_softmax_of_the_top_k_biased_logits_is_gpt_oss_routing():
    """gpt-oss's router takes the top k of the biased logits and a softmax over those k: our softmax over all the
    experts renormalised over the chosen k is the same, up to rounding."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter
    torch.manual_seed(0)
    theirs = GptOssTopKRouter(transformers.GptOssConfig(hidden_size=16, num_local_experts=8, num_experts_per_tok=4))
    router = make_router(dim=16, num_experts=8, top_k=4, renormalize=True, router_bias=True)
    torch.nn.init.normal_(router.gate.weight)
    torch.nn.init.normal_(router.gate.bias)
    with torch.no_grad():
        theirs.weight.copy_(router.gate.weight)
        theirs.bias.copy_(router.gate.bias)
    x = torch.randn(64, 16)
    _, weights, ids = theirs(x)
    compare_routing(router(x, seq_len=16), ids, weights, rel=1e-6)


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_group_limited_sigmoid_routing_is_deepseek_v3_and_glm_routing(family):
    """DeepSeek-V3's and GLM-4.5's router (sigmoid scores, e_score_correction_bias for the choice only, the best
    topk_group of n_group groups by their two best scores, renormalised, times routed_scaling_factor) is ours with
    score_func sigmoid, aux_free_bias (expert_bias = the correction bias), n_group, topk_group, renormalize and
    routed_scaling_factor."""
    transformers = pytest.importorskip("transformers")
    config_class, router_class = {
        "deepseek_v3": (transformers.DeepseekV3Config, "DeepseekV3TopkRouter"),
        "glm4_moe": (transformers.Glm4MoeConfig, "Glm4MoeTopkRouter")}[family]
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    torch.manual_seed(0)
    config = config_class(hidden_size=16, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                          norm_topk_prob=True, routed_scaling_factor=2.5)
    theirs = getattr(module, router_class)(config)
    router = make_router(dim=16, num_experts=16, top_k=4, score_func="sigmoid", renormalize=True, aux_free_bias=True,
                         n_group=4, topk_group=2, routed_scaling_factor=2.5)
    torch.nn.init.normal_(router.gate.weight)
    router.expert_bias.copy_(torch.randn(16) * 0.3)
    with torch.no_grad():
        theirs.weight.copy_(router.gate.weight)
        theirs.e_score_correction_bias.copy_(router.expert_bias)
    x = torch.randn(64, 16)
    _, weights, ids = theirs(x)
    out = router(x, seq_len=16)
    compare_routing(out, ids, weights, rel=1e-6)
    # The group limit and the bias both decide something here: without either, some token's choice changes.
    free = make_router(dim=16, num_experts=16, top_k=4, score_func="sigmoid", aux_free_bias=False)
    free.gate.load_state_dict(router.gate.state_dict())
    assert (free(x, seq_len=16).expert_ids.sort(-1).values != out.expert_ids.sort(-1).values).any()


def test_biased_sigmoid_routing_is_minimax_m2_routing():
    """MiniMax-M2's router (sigmoid scores, e_score_correction_bias for the choice only, renormalised, no groups,
    no scaling) is ours with score_func sigmoid, aux_free_bias and renormalize."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.minimax_m2.modeling_minimax_m2 import MiniMaxM2TopKRouter
    torch.manual_seed(0)
    config = transformers.MiniMaxM2Config(hidden_size=16, num_local_experts=8, num_experts_per_tok=2)
    config._experts_implementation = "eager"  # the class is wrapped as experts are: its own forward
    theirs = MiniMaxM2TopKRouter(config)
    router = make_router(dim=16, num_experts=8, top_k=2, score_func="sigmoid", renormalize=True, aux_free_bias=True)
    torch.nn.init.normal_(router.gate.weight)
    router.expert_bias.copy_(torch.randn(8) * 0.3)
    with torch.no_grad():
        theirs.weight.copy_(router.gate.weight)
    x = torch.randn(64, 16)
    _, weights, ids = theirs(x, router.expert_bias)
    compare_routing(router(x, seq_len=16), ids, weights, rel=1e-6)
