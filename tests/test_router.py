"""Router: losses against hand-computed values, weights, aux-free balancing."""

import math

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
