"""Config: overrides, TOML round trip, one-line errors for bad input."""

import pytest

from moe_dist.config import ConfigError, load_config, parse_args, to_toml


def test_overrides_land_in_the_right_field():
    cfg = load_config("tiny", {"model.dim": "256", "moe.renormalize": "false", "optim.lr": "1e-4",
                               "train.name": "x", "moe.top_k": 1})
    assert cfg.model.dim == 256 and cfg.moe.renormalize is False and cfg.optim.lr == 1e-4
    assert cfg.train.name == "x" and cfg.moe.top_k == 1
    assert cfg.model.n_layers == 4  # from tiny.toml, untouched


def test_parse_args():
    name, overrides, options = parse_args(["--config", "small", "--model.dim", "64", "--train.steps=5", "--resume",
                                           "--world", "8"], "train", {"resume": False, "world": True})
    assert name == "small" and overrides == {"model.dim": "64", "train.steps": "5"}
    assert options == {"resume": True, "world": "8"}
    with pytest.raises(ConfigError, match=r"^train: unknown option '--bogus' \(options: --config, --resume"):
        parse_args(["--bogus"], "train", {"resume": False})


def test_toml_round_trip(tmp_path):
    cfg = load_config("small", {"train.name": 'a "quoted" name', "optim.eps": "1e-8"})
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(cfg))
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize("overrides,needle", [
    ({"model.bogus": "1"}, "unknown key 'model.bogus'"),
    ({"bogus.dim": "1"}, "unknown section in 'bogus.dim'"),
    ({"model.dim": "abc"}, "model.dim must be int, got 'abc'"),
    ({"moe.renormalize": "maybe"}, "moe.renormalize must be bool"),
    ({"model.dim": "130"}, "model.n_heads = 4 must divide model.dim = 130"),
    ({"model.n_kv_heads": "3"}, "model.n_kv_heads = 3 must divide model.n_heads = 4"),
    ({"moe.top_k": "9"}, "moe.top_k = 9 must be between 1 and moe.num_experts = 8"),
    ({"moe.score_func": "relu"}, "moe.score_func = 'relu' is not one of 'softmax', 'sigmoid'"),
    ({"model.attention": "mla", "model.qk_norm": "head"}, "model.qk_norm is a grouped-query attention option"),
    ({"model.rotary_dim": "40"}, "model.rotary_dim = 40 must be even and at most the head size 32"),
    ({"model.rope_scaling": "yarn"}, "model.rope_scaling = 'yarn' needs model.rope_original_max_seq_len > 0"),
    ({"model.full_attention_layers": "9"}, "model.full_attention_layers = [9] must hold layer numbers"),
    ({"parallel.ep": "3"}, "parallel.ep = 3 must divide moe.num_experts = 8"),
    ({"data.seq_len": "4096"}, "data.seq_len = 4096 exceeds model.max_seq_len = 128"),
    ({"model.dim": "0"}, "model.dim = 0 must be >= 1"),
])
def test_bad_values_give_one_line_naming_the_key(overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_bad_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[model]\ndim = 'wide'\n")
    with pytest.raises(ConfigError, match="model.dim must be int, got 'wide'"):
        load_config(str(path))
    path.write_text("[model\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="no such config 'nope'"):
        load_config("nope")
