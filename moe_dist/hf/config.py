"""A Hugging Face config.json as moe_dist config overrides, for the families moe_dist expresses exactly.

Only what maps exactly is accepted: a config.json with a feature the model lacks (a sliding window, tied
embeddings, another activation or rope scaling) is refused with one line naming the key.
"""

from __future__ import annotations

import json
from pathlib import Path

from moe_dist.config import Config, ConfigError, DataConfig, load_config

HF_CONFIG = "config.json"
SUPPORTED = ("mixtral",)

# config.json key -> moe_dist key, for the keys that mean the same thing in both.
MIXTRAL_KEYS = {
    "vocab_size": "model.vocab_size", "hidden_size": "model.dim", "num_hidden_layers": "model.n_layers",
    "num_attention_heads": "model.n_heads", "num_key_value_heads": "model.n_kv_heads",
    "max_position_embeddings": "model.max_seq_len", "rms_norm_eps": "model.norm_eps",
    "initializer_range": "model.init_std", "intermediate_size": "moe.expert_hidden",
    "num_local_experts": "moe.num_experts", "num_experts_per_tok": "moe.top_k",
}
# What Mixtral is, in moe_dist's terms: every layer MoE, softmax top-k renormalised, nothing else.
MIXTRAL_FIXED = {"moe.score_func": "softmax", "moe.renormalize": True, "moe.first_k_dense": 0,
                 "moe.every_n_layers": 1, "moe.shared_expert_hidden": 0, "moe.capacity_factor": 0.0,
                 "moe.aux_free_bias": False, "moe.z_loss_coef": 0.0}


def is_hf_dir(path: str | Path | None) -> bool:
    return path is not None and (Path(path) / HF_CONFIG).is_file()


def aux_loss_coef_from_hf(router_aux_loss_coef: float, top_k: int, moe_layers: int) -> float:
    """transformers' balance loss pools every layer's tokens into one E * sum_i f_i * P_i with f_i counting
    each of the k choices (k times ours, whose f_i is a fraction of the T * k choices), while moe_dist sums one
    loss per layer: for layers alike, coef_ours = coef_hf * k / layers gives the same total."""
    return router_aux_loss_coef * top_k / moe_layers


def aux_loss_coef_to_hf(aux_loss_coef: float, top_k: int, moe_layers: int) -> float:
    """The inverse of aux_loss_coef_from_hf, for config.json on export."""
    return aux_loss_coef * moe_layers / top_k


def mixtral_values(cfg: Config) -> dict[str, object]:
    """The config.json values of MIXTRAL_KEYS, rope_theta and router_aux_loss_coef for `cfg` (a Mixtral shape)."""
    values = {key: getattr(getattr(cfg, ours.split(".")[0]), ours.split(".")[1]) for key, ours in MIXTRAL_KEYS.items()}
    return {**values, "rope_theta": cfg.model.rope_theta,
            "router_aux_loss_coef": aux_loss_coef_to_hf(cfg.moe.aux_loss_coef, cfg.moe.top_k, cfg.model.n_layers)}


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"config: {path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path}: expected a JSON object, got {type(data).__name__}")
    return data


def _mixtral_overrides(data: dict, path: Path) -> dict[str, object]:
    def refuse(key: str, why: str) -> ConfigError:
        return ConfigError(f"config: {path}: {key} = {json.dumps(data.get(key))} is not supported ({why})")

    missing = [key for key in (*MIXTRAL_KEYS, "router_aux_loss_coef") if key not in data]
    if missing:
        raise ConfigError(f"config: {path}: missing {', '.join(missing)}")
    if data.get("sliding_window") is not None:
        raise refuse("sliding_window", "moe_dist attends over the whole sequence")
    if data.get("tie_word_embeddings", False):
        raise refuse("tie_word_embeddings", "moe_dist's embedding and output head are separate")
    if data.get("hidden_act", "silu") != "silu":
        raise refuse("hidden_act", "the experts are SwiGLU")
    if data.get("head_dim") not in (None, data["hidden_size"] // data["num_attention_heads"]):
        raise refuse("head_dim", "moe_dist's head_dim is hidden_size / num_attention_heads")
    for key in ("router_jitter_noise", "attention_dropout"):
        if data.get(key, 0.0) != 0.0:
            raise refuse(key, "moe_dist has no jitter or dropout; set it to 0")
    rope = data.get("rope_parameters") or {"rope_theta": data.get("rope_theta", 1e6), "rope_type": "default"}
    if rope.get("rope_type", "default") != "default" or data.get("rope_scaling") is not None:
        raise refuse("rope_parameters" if "rope_parameters" in data else "rope_scaling",
                     "moe_dist's rotary embedding is unscaled")
    out = {ours: data[key] for key, ours in MIXTRAL_KEYS.items()}
    out["model.rope_theta"] = rope["rope_theta"]
    out["moe.aux_loss_coef"] = aux_loss_coef_from_hf(data["router_aux_loss_coef"], data["num_experts_per_tok"],
                                                     data["num_hidden_layers"])
    return {**out, **MIXTRAL_FIXED}


def config_from_hf(directory: str | Path, overrides: dict[str, object] | None = None) -> Config:
    """The moe_dist config of the Hugging Face model in `directory`, then `overrides` (e.g. data.seq_len)."""
    path = Path(directory) / HF_CONFIG
    data = _read(path)
    model_type = data.get("model_type")
    if model_type not in SUPPORTED:
        raise ConfigError(f"config: {path}: model_type = {json.dumps(model_type)} is not supported "
                          f"(supported: {', '.join(SUPPORTED)})")
    values = _mixtral_overrides(data, path)
    # The default sequence length, or the model's context where that is shorter.
    seq_len = min(DataConfig().seq_len, values["model.max_seq_len"])
    return load_config(None, {"data.seq_len": seq_len, **values, **(overrides or {})})
