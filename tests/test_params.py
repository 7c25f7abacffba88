"""Parameter counter against the real model built on the meta device; FLOPs per token."""

import pytest

from moe_dist.config import load_config
from moe_dist.params import attention_flops_per_token, count_params, main, meta_model_numel

MLA = {"model.attention": "mla", "model.q_lora_rank": "48", "model.kv_lora_rank": "32",
       "model.qk_nope_head_dim": "16", "model.qk_rope_head_dim": "8", "model.v_head_dim": "24"}
# One config per model feature the counter must follow, each on the tiny model.
FEATURES = {
    "mla": MLA,
    "mla, full q projection": {**MLA, "model.q_lora_rank": "0"},
    "mla, output bias": {**MLA, "model.out_bias": "true"},
    "gqa biases and sinks (gpt-oss)": {"model.qkv_bias": "true", "model.out_bias": "true",
                                       "model.attention_sinks": "true", "model.sliding_window": "16",
                                       "model.full_attention_layers": "1,3"},
    "router and expert biases (gpt-oss)": {"moe.router_bias": "true", "moe.expert_biases": "true",
                                           "moe.expert_act": "clamped_swiglu"},
    "tied embeddings": {"model.tie_embeddings": "true"},
    "qk norm per head, partial rotary": {"model.qk_norm": "head", "model.rotary_dim": "16"},
    "qk norm over the projection": {"model.qk_norm": "full"},
    "shared expert, dense first layer": {"moe.shared_expert_hidden": "64", "moe.first_k_dense": "1"},
}


@pytest.mark.parametrize("name", ["tiny", "small", "3b"])
def test_counter_matches_meta_model(name):
    cfg = load_config(name)
    assert count_params(cfg)["total"][0] == meta_model_numel(cfg)


@pytest.mark.parametrize("overrides", FEATURES.values(), ids=FEATURES.keys())
def test_counter_matches_meta_model_for_each_feature(overrides):
    cfg = load_config("tiny", overrides)
    assert count_params(cfg)["total"][0] == meta_model_numel(cfg)


def test_active_parameters_count_the_chosen_experts_biases_and_the_tied_head_once():
    cfg = load_config("tiny", {"moe.expert_biases": "true", "model.tie_embeddings": "true"})
    m, moe = cfg.model, cfg.moe
    rows = count_params(cfg)
    assert rows["output"] == (0, 0)
    expert, moe_layers = 3 * m.dim * moe.expert_hidden + 2 * moe.expert_hidden + m.dim, m.n_layers - 1
    assert rows["experts"] == (moe_layers * moe.num_experts * expert, moe_layers * moe.top_k * expert)


def test_attention_flops_take_the_real_head_dims_and_the_window():
    cfg = load_config("tiny", MLA)
    m, seq_len = cfg.model, cfg.data.seq_len
    assert attention_flops_per_token(cfg) == 6 * m.n_heads * (16 + 8 + 24) * seq_len * m.n_layers
    cfg = load_config("tiny", {"model.sliding_window": "16", "model.full_attention_layers": "1,3"})
    m = cfg.model
    # Layers 0 and 2 attend at most 16 keys, 1 and 3 the whole sequence.
    assert attention_flops_per_token(cfg) == 6 * m.n_heads * 2 * m.head_size * (2 * 16 + 2 * seq_len)


def test_3b_is_about_three_billion(capsys):
    total, active = count_params(load_config("3b"))["total"]
    assert 2.7e9 <= total <= 3.3e9
    assert active < total
    assert main(["--config", "3b"]) == 0
    assert "matches" in capsys.readouterr().out
