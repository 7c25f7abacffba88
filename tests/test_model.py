"""Model: forward/backward, loss at init, causality, MoE placement."""

import math

import pytest
import torch
import torch.nn.functional as F

from moe_dist.config import load_config
from moe_dist.model import MoE, Transformer, moe_layers


def tiny(**overrides):
    cfg = load_config("tiny", overrides)
    return cfg, Transformer(cfg.model, cfg.moe)


def test_forward_backward_and_loss_at_init():
    cfg, model = tiny()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 64))
    logits, aux_loss = model(tokens)
    assert logits.shape == (2, 64, cfg.model.vocab_size)
    loss = F.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten())
    assert abs(loss.item() - math.log(cfg.model.vocab_size)) < 0.1
    assert aux_loss.item() > 0
    (loss + aux_loss).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("overrides", [{}, {"moe.capacity_factor": "1.0"}, {"moe.shared_expert_hidden": "64",
                                                                             "moe.score_func": "sigmoid"}])
def test_causal(overrides):
    cfg, model = tiny(**overrides)
    model.eval()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 32))
    changed = tokens.clone()
    changed[:, 20] = (changed[:, 20] + 1) % cfg.model.vocab_size
    with torch.no_grad():
        a, _ = model(tokens)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20], rtol=0, atol=0)
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_moe_placement():
    _, model = tiny(**{"model.n_layers": "6", "moe.first_k_dense": "1", "moe.every_n_layers": "2"})
    assert [isinstance(layer.ffn, MoE) for layer in model.layers] == [False, True, False, True, False, True]
    _, dense = tiny(**{"moe.num_experts": "0"})
    assert moe_layers(dense) == []


def test_init_scales_residual_projections():
    cfg, model = tiny(**{"model.n_layers": "8", "model.dim": "256", "model.n_heads": "4"})
    std = cfg.model.init_std
    assert abs(model.layers[0].attention.wq.weight.std().item() - std) < 0.1 * std
    residual = std / math.sqrt(2 * 8)
    assert abs(model.layers[0].attention.wo.weight.std().item() - residual) < 0.1 * residual
    assert abs(model.layers[1].ffn.experts.w2.std().item() - residual) < 0.1 * residual


def test_dropped_tokens_are_counted():
    _, model = tiny(**{"moe.capacity_factor": "0.5"})
    _, _, routing = model(torch.randint(0, 100, (2, 64)), routing=True)
    assert routing.dropped.shape == (len(moe_layers(model)),) and routing.dropped.sum() > 0
