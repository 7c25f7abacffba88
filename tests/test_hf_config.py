"""A Hugging Face config.json as a moe_dist config: Mixtral maps exactly, anything else is one line."""

from __future__ import annotations

import json

import pytest
import transformers

from moe_dist.hf.config import config_from_hf
from moe_dist.params import count_params, main

TINY_MIXTRAL = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                    router_aux_loss_coef=0.02)


def save(tmp_path, **overrides):
    transformers.MixtralConfig(**{**TINY_MIXTRAL, **overrides}).save_pretrained(tmp_path)
    return tmp_path


def test_mixtral_config_maps_exactly(tmp_path):
    cfg = config_from_hf(save(tmp_path, rope_theta=5e5), {"data.seq_len": "64"})
    m, moe = cfg.model, cfg.moe
    assert (m.vocab_size, m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.max_seq_len) == (320, 64, 3, 4, 2, 256)
    assert (moe.num_experts, moe.top_k, moe.expert_hidden, moe.score_func, moe.renormalize) == (4, 2, 96, "softmax",
                                                                                                True)
    assert m.rope_theta == 5e5 and cfg.data.seq_len == 64
    assert moe.aux_loss_coef == pytest.approx(0.02 * 2 / 3)  # transformers pools k-fold counts over layers
    hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(**TINY_MIXTRAL))
    assert count_params(cfg)["total"][0] == sum(p.numel() for p in hf.parameters())


def test_planner_takes_a_mixtral_dir(tmp_path, capsys):
    # Mixtral 8x7B's shape: 46.7B parameters, 12.9B active.
    save(tmp_path, vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
         num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, max_position_embeddings=32768)
    assert main(["--config", str(tmp_path), "--world", "16", "--ep", "8"]) == 0
    out = capsys.readouterr().out
    assert "total 46.70B parameters, 12.88B active per token" in out
    assert "16 ranks = dp_shard 2 x ep 8" in out


@pytest.mark.parametrize("change, message", [
    ({"model_type": "deepseek_v3"},
     'model_type = "deepseek_v3" is not supported (supported: mixtral, qwen2_moe, qwen3_moe, olmoe)'),
    ({"sliding_window": 4096}, "sliding_window = 4096 is not supported (moe_dist attends over the whole sequence)"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings = true is not supported"),
    ({"hidden_act": "gelu"}, 'hidden_act = "gelu" is not supported (the experts are SwiGLU)'),
    ({"router_jitter_noise": 0.1}, "router_jitter_noise = 0.1 is not supported"),
    ({"rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0}}, "rope_parameters = {"),
    ({"num_local_experts": None}, "missing num_local_experts"),
])
def test_what_does_not_map_is_one_line_naming_the_key(tmp_path, capsys, change, message):
    path = save(tmp_path) / "config.json"
    data = {key: value for key, value in {**json.loads(path.read_text()), **change}.items() if value is not None}
    path.write_text(json.dumps(data))  # a None in `change` removes the key
    assert main(["--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and str(path) in err, err


def test_unreadable_config_json_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    assert main(["--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a readable JSON file" in err
