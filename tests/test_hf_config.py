"""A Hugging Face config.json as a moe_dist config: the four families map exactly, anything else is one line."""

from __future__ import annotations

import copy
import json

import pytest
import transformers

from hf_models import COMMON, FAMILIES, NEW_FAMILIES
from moe_dist.config import CONFIG_DIR
from moe_dist.config import ConfigError
from moe_dist.hf.config import config_from_hf, family_of, hf_config, with_init_from
from moe_dist.model.transformer import is_moe_layer
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


def _recipe(directory, world, ep, device_gib, parameters, dp_shard, checkpointed, total_gib):
    """A README recipe's row: the planner's lines for its parameters, layout and the total it runs with."""
    label = f"total, {'with' if checkpointed else 'no'} activation checkpointing"
    total = f"{label:<40} {total_gib + ' GiB':>11}{'' if checkpointed else ' (configured)'} | fits"
    return directory, world, ep, device_gib, [parameters, f"{world} ranks = dp_shard {dp_shard} x ep {ep}", total]


# (model dir, world, ep, device GiB, parameters line, dp_shard, checkpointed, total GiB), as in README's recipes.
@pytest.mark.parametrize("directory, world, ep, device_gib, lines", [
    _recipe("Qwen3-30B-A3B", 8, 8, 80, "total 30.53B parameters, 3.35B active per token", 1, True, "65.86"),
    _recipe("Qwen3-30B-A3B", 16, 8, 80, "total 30.53B", 2, False, "62.59"),
    _recipe("Mixtral-8x7B-v0.1", 32, 8, 80, "total 46.70B parameters, 12.88B active per token", 4, False, "50.68"),
    _recipe("DeepSeek-V3", 192, 64, 80, "total 671.03B parameters, 37.55B active per token", 3, True, "70.63"),
    _recipe("DeepSeek-V3", 96, 32, 141, "total 671.03B", 3, True, "122.74"),
    _recipe("Kimi-K2-Instruct", 312, 24, 80, "total 1.03T parameters, 32.86B active per token", 13, True, "71.47"),
    _recipe("Kimi-K2-Instruct", 144, 48, 141, "total 1.03T", 3, True, "125.97"),
    _recipe("GLM-4.5-Air", 32, 32, 80, "total 106.85B parameters, 13.42B active per token", 1, True, "62.31"),
    _recipe("GLM-4.5-Air", 16, 16, 141, "total 106.85B", 1, True, "112.23"),
    _recipe("gpt-oss-120b", 32, 32, 80, "total 116.83B parameters, 5.71B active per token", 1, True, "66.56"),
    _recipe("gpt-oss-120b", 16, 16, 141, "total 116.83B", 1, True, "121.70"),
    _recipe("gpt-oss-20b", 8, 8, 80, "total 20.91B parameters, 4.19B active per token", 1, False, "62.86"),
    _recipe("gpt-oss-20b", 4, 4, 141, "total 20.91B", 1, False, "102.56"),
    _recipe("MiniMax-M2", 64, 64, 80, "total 228.69B parameters, 11.03B active per token", 1, True, "66.31"),
    _recipe("MiniMax-M2", 32, 32, 141, "total 228.69B", 1, True, "119.97"),
])
def test_the_readme_recipes_figures(capsys, directory, world, ep, device_gib, lines):
    assert main(["--config", str(CONFIG_DIR / "hf" / directory), "--world", str(world), "--ep", str(ep),
                 "--device-memory", f"{device_gib}GiB", "--data.seq_len", "4096", "--data.micro_batch", "1"]) == 0
    out = capsys.readouterr().out
    assert all(line in out for line in lines), out


@pytest.mark.parametrize("change, message", [
    ({"model_type": "jamba"}, 'model_type = "jamba" is not supported (supported: mixtral, qwen2_moe, qwen3_moe, '
                              'olmoe, deepseek_v3, kimi_k2, glm4_moe, gpt_oss, minimax_m2, llama, mistral, qwen2, '
                              'qwen3)'),
    ({"model_type": "qwen3_next"}, 'model_type = "qwen3_next" is not supported yet (hybrid linear attention)'),
    ({"model_type": "deepseek_v32"}, 'model_type = "deepseek_v32" is not supported yet (DeepSeek sparse attention)'),
    ({"hidden_act": "gelu"}, 'hidden_act = "gelu" is not supported (the experts are SwiGLU)'),
    ({"router_jitter_noise": 0.1}, "router_jitter_noise = 0.1 is not supported"),
    ({"rope_parameters": {"rope_theta": 1e6, "rope_type": "dynamic", "factor": 4.0}}, "rope_parameters = {"),
    ({"num_local_experts": None}, "missing num_local_experts"),
    # Named by the key that scales, beside transformers 5's unscaled rope_parameters.
    ({"rope_parameters": None, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}},
     'rope_scaling = {"rope_type": "longrope"'),
    ({"rope_parameters": {"rope_type": "yarn", "factor": "4"}}, 'rope_parameters.factor = "4" must be a number'),
    # Strings, booleans and lists where numbers belong (load_config would take "8" as 8 and true as 1).
    ({"num_local_experts": "8"}, 'num_local_experts = "8" must be an integer'),
    ({"hidden_size": True}, "hidden_size = true must be an integer"),
    ({"num_experts_per_tok": [2]}, "num_experts_per_tok = [2] must be an integer"),
    ({"rms_norm_eps": "1e-5"}, 'rms_norm_eps = "1e-5" must be a number'),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "1e6"}},
     'rope_parameters.rope_theta = "1e6" must be a number'),
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


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_maps_exactly_and_round_trips(tmp_path, family):
    """Parameter count and MoE layer pattern equal transformers' model; export's config.json maps back to the
    same config."""
    config_cls, model_cls, values = FAMILIES[family]
    sparse_step = {} if family in NEW_FAMILIES else {"decoder_sparse_step": 2}  # read by the Qwen families
    hf = model_cls(config_cls(**copy.deepcopy({**COMMON, **values, **sparse_step})))
    hf.config.save_pretrained(tmp_path)
    cfg = config_from_hf(tmp_path, {"data.seq_len": "16"})
    assert count_params(cfg)["total"][0] == sum(p.numel() for p in hf.parameters())
    sparse = [hasattr(layer.mlp, "experts") for layer in hf.model.layers]
    assert [is_moe_layer(i, cfg.moe) for i in range(cfg.model.n_layers)] == sparse
    assert family_of(cfg).model_type == family
    (tmp_path / "back").mkdir()
    (tmp_path / "back" / "config.json").write_text(json.dumps(hf_config(cfg, family_of(cfg), "float32", None, None)))
    back = config_from_hf(tmp_path / "back", {"data.seq_len": "16"})
    assert back.model == cfg.model
    assert back.moe.aux_loss_coef == pytest.approx(cfg.moe.aux_loss_coef)
    assert [is_moe_layer(i, back.moe) for i in range(cfg.model.n_layers)] == sparse
    assert (back.moe.num_experts, back.moe.renormalize, back.moe.shared_expert_gate) == (
        cfg.moe.num_experts, cfg.moe.renormalize, cfg.moe.shared_expert_gate)


@pytest.mark.parametrize("family, change, message", [
    ("qwen2_moe", {"layer_types": ["full_attention", 3]}, "layer_types = [\"full_attention\", 3] must be a list of"),
    ("qwen3_moe", {"attention_bias": 1}, "attention_bias = 1 must be true or false"),
    ("qwen3_moe", {"moe_intermediate_size": None}, "missing moe_intermediate_size"),
    ("olmoe", {"head_dim": 16}, "head_dim = 16 is not supported (OLMoE's k_norm"),
    ("olmoe", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope_parameters"),
    ("qwen2_moe", {"mlp_only_layers": [7]}, "moe.dense_layers = [7] must hold layer numbers in [0, model.n_layers"),
    ("qwen2_moe", {"mlp_only_layers": [True]}, "mlp_only_layers = [true] must be a list of integers"),
    ("qwen3_moe", {"norm_topk_prob": "false"}, 'norm_topk_prob = "false" must be true or false'),
    ("deepseek_v3", {"attention_bias": True}, "attention_bias = true is not supported"),
    ("deepseek_v3", {"kv_lora_rank": None}, "missing kv_lora_rank"),
    ("gpt_oss", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_parameters = {"),
    ("minimax_m2", {"scoring_func": "softmax"}, 'scoring_func = "softmax" is not supported'),
    ("glm4_moe", {"n_group": "2"}, 'n_group = "2" must be an integer'),
])
def test_family_features_that_do_not_map_are_one_line(tmp_path, capsys, family, change, message):
    config_cls, _, values = FAMILIES[family]
    config_cls(**copy.deepcopy({**COMMON, **values})).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = {key: value for key, value in {**json.loads(path.read_text()), **change}.items() if value is not None}
    path.write_text(json.dumps(data))
    assert main(["--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and str(path) in err, err


def test_init_from_values_are_checked_with_the_checkpoints_model(tmp_path):
    """A sequence length and an EP degree that fit the checkpoint but not the TOML's own model."""
    save(tmp_path, max_position_embeddings=512, num_local_experts=4)
    cfg = with_init_from("tiny", {"train.init_from": str(tmp_path), "data.seq_len": "256", "parallel.ep": "4",
                                  "moe.capacity_factor": "1.5"})
    assert (cfg.data.seq_len, cfg.parallel.ep, cfg.moe.num_experts, cfg.model.dim) == (256, 4, 4, 64)
    assert cfg.moe.capacity_factor == 1.5  # the command line wins over the checkpoint's values
    with pytest.raises(ConfigError, match="data.seq_len = 1024 exceeds model.max_seq_len = 512"):
        with_init_from("tiny", {"train.init_from": str(tmp_path), "data.seq_len": "1024"})
