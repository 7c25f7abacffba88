"""Hugging Face config.json <-> moe_dist config, for the families moe_dist expresses exactly (hf/families.py).

Only what maps exactly is accepted: a config.json with a feature the model lacks (another activation, a rope type
other than default / linear / llama3 / yarn, jitter, dropout) is refused with one line naming the key. Each family's
routing and attention options become moe_dist's own (model.qk_norm, model.attention, moe.shared_expert_gate, ...),
so the model code knows nothing about Hugging Face. A dense source (a dense family, or a moe_dist export without
experts) gives model.* and moe.num_experts = 0: a run that sets moe.num_experts > 0 upcycles it (hf/upcycle.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from moe_dist.config import Config, ConfigError, DataConfig, ModelConfig, MoEConfig, load_config
from moe_dist.hf.families import FAMILIES, MODEL_TYPES, NOT_YET, DenseFamily, Family
from moe_dist.hf.upcycle import check_upcycle
from moe_dist.model.transformer import is_moe_layer

HF_CONFIG = "config.json"
NATIVE_CONFIG = "config.toml"


# config.json key -> moe_dist key, for the keys that mean the same thing in every family (dense ones: MODEL_KEYS).
MODEL_KEYS = {
    "vocab_size": "model.vocab_size", "hidden_size": "model.dim", "num_hidden_layers": "model.n_layers",
    "num_attention_heads": "model.n_heads", "max_position_embeddings": "model.max_seq_len",
    "rms_norm_eps": "model.norm_eps", "initializer_range": "model.init_std",
}
COMMON_KEYS = {**MODEL_KEYS, "num_experts_per_tok": "moe.top_k"}
# What every family is unless its entry or config.json says otherwise, in moe_dist's terms: full causal attention,
# and in the MoE families softmax top-k routing over all experts, no capacity, no selection bias, no z-loss
# (transformers has none).
FIXED_MODEL = {f"model.{name}": value for name, value in asdict(ModelConfig()).items()
               if f"model.{name}" not in MODEL_KEYS.values()}
FIXED = {**FIXED_MODEL,
         **{f"moe.{name}": value for name, value in asdict(MoEConfig()).items()
            if name not in ("top_k", "grouped_mm_backend", "bias_update_rate", "aux_loss_coef")},
         "moe.capacity_factor": 0.0, "moe.aux_free_bias": False, "moe.z_loss_coef": 0.0, "moe.renormalize": False}
# transformers' rope_parameters (rope_scaling before 5.0) -> moe_dist's, per scaling kind.
ROPE_KEYS = {"factor": "model.rope_factor", "original_max_position_embeddings": "model.rope_original_max_seq_len",
             "low_freq_factor": "model.rope_low_freq_factor", "high_freq_factor": "model.rope_high_freq_factor",
             "beta_fast": "model.rope_beta_fast", "beta_slow": "model.rope_beta_slow",
             "truncate": "model.rope_truncate", "mscale": "model.rope_mscale",
             "mscale_all_dim": "model.rope_mscale_all_dim", "attention_factor": "model.rope_attention_factor"}
ROPE_KINDS = {"default": (), "linear": ("factor",),
              "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
              "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate", "mscale",
                       "mscale_all_dim", "attention_factor")}
# config.json's special-token ids: an export of an imported model carries the source's exactly.
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
SOURCE_TOKEN_IDS = "source_token_ids.json"  # a run's copy of them, beside its tokenizer.json


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON's true is a Python int


# What each config.json value moe_dist reads must be (null: the key's default, or missing where it is required):
# load_config would take "8" as a command-line string and true as 1.
VALUE_KINDS = {
    **dict.fromkeys(("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "max_position_embeddings", "num_experts_per_tok", "num_local_experts", "num_experts",
                     "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size", "head_dim",
                     "decoder_sparse_step", "n_routed_experts", "n_shared_experts", "first_k_dense_replace",
                     "n_group", "topk_group", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "q_lora_rank", "sliding_window", "max_window_layers", "rotary_dim", "num_nextn_predict_layers",
                     "rope_parameters.original_max_position_embeddings"), "an integer"),
    **dict.fromkeys(("rms_norm_eps", "initializer_range", "router_aux_loss_coef", "rope_theta", "clip_qkv",
                     "router_jitter_noise", "attention_dropout", "routed_scaling_factor", "swiglu_alpha",
                     "swiglu_limit", "partial_rotary_factor", *(f"rope_parameters.{key}" for key in (
                         "rope_theta", "partial_rotary_factor", "factor", "low_freq_factor", "high_freq_factor",
                         "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"))), "a number"),
    **dict.fromkeys(("norm_topk_prob", "qkv_bias", "tie_word_embeddings", "use_sliding_window", "attention_bias",
                     "use_qk_norm", "rope_interleave", "rope_parameters.truncate"), "true or false"),
    "mlp_only_layers": "a list of integers", "layer_types": "a list of strings",
    "rope_parameters": "an object", "rope_scaling": "an object",
}
IS_KIND = {"an integer": _integer, "a number": lambda v: _integer(v) or isinstance(v, float),
           "true or false": lambda v: isinstance(v, bool),
           "a list of integers": lambda v: isinstance(v, list) and all(map(_integer, v)),
           "a list of strings": lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v),
           "an object": lambda v: isinstance(v, dict)}


def is_hf_dir(path: str | Path | None) -> bool:
    return path is not None and path != "" and (Path(path) / HF_CONFIG).is_file()


def is_native_export(path: str | Path) -> bool:
    """A moe_dist export (python -m moe_dist.export, native format): config.toml and model.safetensors."""
    return (Path(path) / NATIVE_CONFIG).is_file() and (Path(path) / "model.safetensors").is_file()


def hf_tokenizer(directory: str | Path) -> Path | None:
    """The tokenizer.json of a Hugging Face model dir, if it has one."""
    path = Path(directory) / "tokenizer.json"
    return path if path.is_file() else None


def aux_loss_coef_from_hf(router_aux_loss_coef: float, top_k: int, moe_layers: int) -> float:
    """transformers' balance loss pools every MoE layer's tokens into one E * sum_i f_i * P_i with f_i counting
    each of the k choices (k times ours, whose f_i is a fraction of the T * k choices), while moe_dist sums one
    loss per layer: for layers alike, coef_ours = coef_hf * k / layers gives the same total."""
    return router_aux_loss_coef * top_k / max(moe_layers, 1)


def aux_loss_coef_to_hf(aux_loss_coef: float, top_k: int, moe_layers: int) -> float:
    """The inverse of aux_loss_coef_from_hf, for config.json on export."""
    return aux_loss_coef * max(moe_layers, 1) / top_k


def moe_layer_count(cfg: Config) -> int:
    return sum(is_moe_layer(i, cfg.moe) for i in range(cfg.model.n_layers))


def read_hf_config(directory: str | Path) -> tuple[Family | DenseFamily, dict, Path]:
    """(family, config.json's contents, its path); ConfigError for an unreadable file or another model_type."""
    path = Path(directory) / HF_CONFIG
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"config: {path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path}: expected a JSON object, got {type(data).__name__}")
    model_type = data.get("model_type")
    if model_type in NOT_YET:
        raise ConfigError(f"config: {path}: model_type = {json.dumps(model_type)} is not supported yet "
                          f"({NOT_YET[model_type]})")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"config: {path}: model_type = {json.dumps(model_type)} is not supported "
                          f"(supported: {', '.join(MODEL_TYPES)})")
    return MODEL_TYPES[model_type], data, path


def _rope_parameters(family: Family | DenseFamily, data: dict) -> dict:
    """transformers 5's rope_parameters, or before it rope_scaling and rope_theta, or the family's defaults."""
    given = data.get("rope_parameters") or data.get("rope_scaling")
    params = {"rope_theta": data.get("rope_theta", family.default_rope_theta),
              **({} if given else family.default_rope), **(given or {})}
    for key in ("partial_rotary_factor", "rotary_dim"):  # top-level in GLM's and MiniMax's own config.json
        if key in data:
            params.setdefault(key, data[key])
    if "type" in params:  # rope_scaling's name for it
        params.setdefault("rope_type", params["type"])
    params.setdefault("rope_type", "default")
    return params


def _check_kinds(data: dict, path: Path, rope: dict) -> None:
    """ConfigError naming the first value of another JSON type than moe_dist reads it as (VALUE_KINDS)."""
    values = {key: data.get(key) for key in VALUE_KINDS}
    values.update({f"rope_parameters.{key}": rope.get(key) for key in ("rope_theta", "partial_rotary_factor",
                                                                        *ROPE_KEYS)})
    for key, value in values.items():
        if value is not None and not IS_KIND[VALUE_KINDS[key]](value):
            raise ConfigError(f"config: {path}: {key} = {json.dumps(value)} must be {VALUE_KINDS[key]}")


def _refusal(data: dict, path: Path, key: str, why: str) -> ConfigError:
    return ConfigError(f"config: {path}: {key} = {json.dumps(data.get(key))} is not supported ({why})")


def _check_refused(family: Family | DenseFamily, data: dict, path: Path, rope: dict) -> None:
    """Refuse the features moe_dist lacks, naming the key."""
    def refuse_if(bad: bool, key: str, why: str) -> None:
        if bad:
            raise _refusal(data, path, key, why)

    for key, refused, why in family.refuses:  # the family's own, the activation first
        refuse_if(refused(data), key, why)
    for key in ("router_jitter_noise", "attention_dropout"):
        refuse_if(data.get(key, 0.0) not in (0, None), key, "moe_dist has no jitter or dropout; set it to 0")
    refuse_if(bool(data.get("mlp_bias")), "mlp_bias", "moe_dist's MLPs have no biases")
    key = "rope_parameters" if data.get("rope_parameters") else "rope_scaling"  # named by the key that scales
    refuse_if(rope["rope_type"] not in ROPE_KINDS, key, f"rope types: {', '.join(ROPE_KINDS)}")


def _rope_values(data: dict, rope: dict, head_size: int) -> dict[str, object]:
    kind = rope["rope_type"]
    values = {"model.rope_theta": rope["rope_theta"], "model.rope_scaling": "none" if kind == "default" else kind}
    values.update({ROPE_KEYS[key]: rope[key] for key in ROPE_KINDS[kind] if rope.get(key) is not None})
    if kind in ("llama3", "yarn"):
        values.setdefault("model.rope_original_max_seq_len", data["max_position_embeddings"])
    if kind == "yarn" and rope.get("factor") is None:
        values["model.rope_factor"] = data["max_position_embeddings"] / values["model.rope_original_max_seq_len"]
    if "rotary_dim" in rope or "partial_rotary_factor" in rope:
        rotary = rope.get("rotary_dim") or int(head_size * rope["partial_rotary_factor"])
        values["model.rotary_dim"] = 0 if rotary == head_size else rotary
    return values


def _window_values(family: Family | DenseFamily, data: dict) -> dict[str, object]:
    """Sliding windows as transformers applies them: in the layers the family's window_layers names."""
    window, layers = data.get("sliding_window") or 0, family.window_layers(data)
    if not window or layers is None:
        return {}
    return {"model.sliding_window": window,
            "model.full_attention_layers": [i for i, kind in enumerate(layers) if kind != "sliding_attention"]}


def _required(family: Family | DenseFamily) -> list[str]:
    """The config.json keys that `family` cannot do without."""
    if isinstance(family, DenseFamily):
        return [*MODEL_KEYS, *family.required]
    return [*COMMON_KEYS, family.num_experts_key, family.expert_hidden_key, *family.required]


def hf_values(directory: str | Path) -> dict[str, object]:
    """Every model.* and moe.* value of the Hugging Face model in `directory`, as moe_dist overrides; of a dense
    model, model.* and moe.num_experts = 0 (what to upcycle it into is the run's to say)."""
    family, data, path = read_hf_config(directory)
    rope = _rope_parameters(family, data)
    _check_kinds(data, path, rope)
    dense = isinstance(family, DenseFamily)
    if not dense and data.get(family.num_experts_key) is None and "num_local_experts" in data:  # Qwen3-MoE's
        data[family.num_experts_key] = data["num_local_experts"]  # alias, which transformers 5 writes
    missing = [key for key in _required(family) if data.get(key) is None]
    if missing:
        raise ConfigError(f"config: {path}: missing {', '.join(missing)}")
    _check_refused(family, data, path, rope)
    values = {**(FIXED_MODEL if dense else FIXED), **{ours: data[key] for key, ours in MODEL_KEYS.items()},
              "model.n_kv_heads": data.get("num_key_value_heads") or data["num_attention_heads"],
              "model.tie_embeddings": bool(data.get("tie_word_embeddings", False))}
    values.update({"moe.num_experts": 0} if dense else {
        "moe.top_k": data["num_experts_per_tok"], "moe.num_experts": data[family.num_experts_key],
        "moe.expert_hidden": data[family.expert_hidden_key]})
    head_size = data.get("head_dim") or data["hidden_size"] // data["num_attention_heads"]
    if head_size != data["hidden_size"] // data["num_attention_heads"]:
        values["model.head_dim"] = head_size
    values.update({**_rope_values(data, rope, head_size), **_window_values(family, data), **family.values(data)})
    try:
        shape = load_config(None, {**values, "data.seq_len": 1, "parallel.ep": 1})
    except ConfigError as e:  # a value out of range, named by our key: name the file too
        raise ConfigError(str(e).replace("config: ", f"config: {path}: ", 1)) from None
    if not dense:
        values.setdefault("moe.aux_loss_coef", aux_loss_coef_from_hf(
            data.get("router_aux_loss_coef") or 0.0, data["num_experts_per_tok"], moe_layer_count(shape)))
    return values


def is_dense_source(source: str | Path) -> bool:
    """A model dir to upcycle: a dense family's config.json, or a moe_dist export without experts."""
    if is_native_export(source):
        return load_config(str(Path(source) / NATIVE_CONFIG)).moe.num_experts == 0
    return isinstance(read_hf_config(source)[0], DenseFamily)


def upcycles(cfg: Config) -> bool:
    """The run starts its experts from train.init_from's dense MLPs."""
    return bool(cfg.train.init_from) and cfg.moe.num_experts > 0 and is_dense_source(cfg.train.init_from)


def _upcycle_checked(cfg: Config, source: str | Path, dense: bool) -> Config:
    """`cfg`, once the experts it asks of the model in `source` (dense or not; "" for none) can start from it."""
    if dense and cfg.moe.num_experts:
        check_upcycle(cfg, str(source))
    elif cfg.train.upcycle_noise:
        raise ConfigError(f"config: train.upcycle_noise = {cfg.train.upcycle_noise} applies only to upcycling "
                          f"(train.init_from a dense model, moe.num_experts > 0)")
    return cfg


def config_from_hf(directory: str | Path, overrides: dict[str, object] | None = None) -> Config:
    """The moe_dist config of the Hugging Face model in `directory`, then `overrides` (e.g. data.seq_len; of a
    dense model, the moe.* values to upcycle it into)."""
    values = hf_values(directory)
    # The default sequence length, or the model's context where that is shorter.
    seq_len = min(DataConfig().seq_len, values["model.max_seq_len"])
    cfg = load_config(None, {"data.seq_len": seq_len, **values, **(overrides or {})})
    return _upcycle_checked(cfg, directory, values["moe.num_experts"] == 0)


def with_init_from(name: str | None, overrides: dict[str, object]) -> Config:
    """The run's config when train.init_from names a model to start from: the TOML file, then the model and moe
    values of that model (its config.json, or a moe_dist export's config.toml), then the command line's
    overrides (which win: e.g. moe.capacity_factor). A dense model gives moe.num_experts = 0 alone: the command
    line's moe.num_experts > 0 upcycles it, with the other moe.* values of the TOML file and the command line."""
    init_from = load_config(name, overrides, check=False).train.init_from  # checked with the model's values below
    if not init_from:
        return _upcycle_checked(load_config(name, overrides), "", dense=False)
    if is_native_export(init_from):
        saved = load_config(str(Path(init_from) / NATIVE_CONFIG))
        sections = ("model", "moe") if saved.moe.num_experts else ("model",)
        values = {f"{section}.{key}": value for section in sections
                  for key, value in asdict(getattr(saved, section)).items()}
        values.setdefault("moe.num_experts", 0)  # a dense export's other moe.* mean nothing
    elif is_hf_dir(init_from):
        values = hf_values(init_from)
    else:
        raise ConfigError(f"config: train.init_from = {init_from!r} is neither a Hugging Face model dir ({HF_CONFIG}) "
                          f"nor a moe_dist export ({NATIVE_CONFIG} and model.safetensors)")
    return _upcycle_checked(load_config(name, {**values, **overrides}), init_from, values["moe.num_experts"] == 0)


def family_of(cfg: Config) -> Family:
    """The family whose layout a model's features imply (the first that holds them all), else Mixtral's."""
    return next((family for family in FAMILIES.values() if family.check(cfg) is None), FAMILIES["mixtral"])


def family_blocker(cfg: Config, family: Family) -> str | None:
    """The config key that keeps the model from mapping onto `family`, as a phrase; None if it maps."""
    if cfg.moe.num_experts == 0:
        return "moe.num_experts = 0 (a dense model)"
    failed = family.check(cfg)
    if failed is None:
        return None
    key, _ = failed
    if key == "moe.dense_layers":
        return f"{_dense_layers_key(cfg)} ({family.architecture} has no dense layers there)"
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    return f"{key} = {json.dumps(value) if not isinstance(value, str) else repr(value)} (not {family.architecture}'s)"


def _dense_layers_key(cfg: Config) -> str:
    moe = cfg.moe
    if moe.first_k_dense:
        return f"moe.first_k_dense = {moe.first_k_dense}"
    if moe.every_n_layers > 1:
        return f"moe.every_n_layers = {moe.every_n_layers}"
    return f"moe.dense_layers = {moe.dense_layers}"


def source_token_ids(cfg: Config, run_files: Path | None = None) -> dict[str, object] | None:
    """The special-token ids of the Hugging Face model a run was imported from, null included and absent ones left
    out (transformers' defaults then stand, as for the source): the run's own copy in `run_files` (SOURCE_TOKEN_IDS,
    written when it started, so that a source moved or deleted since does not matter), else train.init_from's
    config.json; None for a model of our own or one whose source is no longer there."""
    copy = run_files / SOURCE_TOKEN_IDS if run_files is not None else None
    if copy is not None and copy.is_file():
        return json.loads(copy.read_text())
    if not is_hf_dir(cfg.train.init_from):
        return None
    _, data, _ = read_hf_config(cfg.train.init_from)
    return {key: data[key] for key in TOKEN_ID_KEYS if key in data}


def _rope_config(cfg: Config, family: Family) -> dict[str, object]:
    m = cfg.model
    kind = "default" if m.rope_scaling == "none" else m.rope_scaling
    rope = {"rope_type": kind, "rope_theta": m.rope_theta}
    for key in ROPE_KINDS[kind]:
        _, name = ROPE_KEYS[key].split(".")
        value = getattr(m, name)
        if key not in ("mscale", "mscale_all_dim", "attention_factor") or value:  # 0: absent, as transformers has it
            rope[key] = value
    if "model.rotary_dim" in family.holds:  # GLM-4.5 and MiniMax-M2 rotate part of each head
        rope["partial_rotary_factor"] = (m.rotary_dim or m.head_size) / m.head_size
    return {"rope_parameters": rope}


def hf_config(cfg: Config, family: Family, dtype: str, bos: int | None, eos: int | None,
              token_ids: dict[str, object] | None = None) -> dict:
    """config.json for the family's transformers class (checked with family_blocker first). Its special-token ids
    are `token_ids` exactly where given (source_token_ids), else `bos` and `eos`."""
    m, moe = cfg.model, cfg.moe
    return {"architectures": [family.architecture], "model_type": family.model_type, "torch_dtype": dtype,
            **{key: getattr(getattr(cfg, ours.split(".")[0]), ours.split(".")[1]) for key, ours in COMMON_KEYS.items()},
            "num_key_value_heads": m.n_kv_heads, "head_dim": m.head_size,
            family.num_experts_key: moe.num_experts, family.expert_hidden_key: moe.expert_hidden,
            "router_aux_loss_coef": aux_loss_coef_to_hf(moe.aux_loss_coef, moe.top_k, moe_layer_count(cfg)),
            "hidden_act": "silu", "attention_dropout": 0.0, "tie_word_embeddings": m.tie_embeddings,
            "use_cache": True, "output_router_logits": False, **_rope_config(cfg, family),
            **family.window_config(cfg), **family.config(cfg),
            **({"bos_token_id": bos, "eos_token_id": eos} if token_ids is None else token_ids)}
