"""Hugging Face config.json <-> moe_dist config, for the MoE families moe_dist expresses exactly.

Only what maps exactly is accepted: a config.json with a feature the model lacks (a sliding window, tied
embeddings, another activation, rope scaling, an attention bias on the output) is refused with one line
naming the key. Each family's routing and attention options become moe_dist's own (model.qk_norm,
moe.shared_expert_gate, ...), so the model code knows nothing about Hugging Face.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from moe_dist.config import Config, ConfigError, DataConfig, load_config
from moe_dist.model.transformer import is_moe_layer

HF_CONFIG = "config.json"
NATIVE_CONFIG = "config.toml"


@dataclass(frozen=True)
class Family:
    """One transformers MoE family: its names for the expert count and size, and its checkpoint key names."""

    model_type: str
    architecture: str
    num_experts_key: str
    expert_hidden_key: str
    moe_block: str  # the MoE module under model.layers.<i>.
    expert_names: tuple[str, str, str]  # per-expert keys of (gate, up, down): experts.<j>.<name>.weight
    default_rope_theta: float  # transformers' value when config.json has none


FAMILIES = {f.model_type: f for f in (
    Family("mixtral", "MixtralForCausalLM", "num_local_experts", "intermediate_size", "block_sparse_moe",
           ("w1", "w3", "w2"), 1e6),
    Family("qwen2_moe", "Qwen2MoeForCausalLM", "num_experts", "moe_intermediate_size", "mlp",
           ("gate_proj", "up_proj", "down_proj"), 1e4),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", "num_experts", "moe_intermediate_size", "mlp",
           ("gate_proj", "up_proj", "down_proj"), 1e4),
    Family("olmoe", "OlmoeForCausalLM", "num_experts", "intermediate_size", "mlp",
           ("gate_proj", "up_proj", "down_proj"), 1e4),
)}

# config.json key -> moe_dist key, for the keys that mean the same thing in every family.
COMMON_KEYS = {
    "vocab_size": "model.vocab_size", "hidden_size": "model.dim", "num_hidden_layers": "model.n_layers",
    "num_attention_heads": "model.n_heads", "max_position_embeddings": "model.max_seq_len",
    "rms_norm_eps": "model.norm_eps", "initializer_range": "model.init_std", "num_experts_per_tok": "moe.top_k",
}
# What every family is, in moe_dist's terms: softmax top-k routing over all experts, no capacity, no selection
# bias, no z-loss (transformers has none); the family's own options are set by _family_values.
FIXED = {"moe.score_func": "softmax", "moe.capacity_factor": 0.0, "moe.aux_free_bias": False, "moe.z_loss_coef": 0.0,
         "moe.n_group": 1, "moe.topk_group": 1, "moe.routed_scaling_factor": 1.0, "moe.seq_aux_loss_coef": 0.0,
         "moe.first_k_dense": 0, "moe.every_n_layers": 1, "moe.dense_layers": [], "moe.shared_expert_hidden": 0,
         "moe.shared_expert_gate": False, "model.head_dim": 0, "model.qkv_bias": False, "model.qk_norm": "none",
         "model.clip_qkv": 0.0}
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
                     "decoder_sparse_step"), "an integer"),
    **dict.fromkeys(("rms_norm_eps", "initializer_range", "router_aux_loss_coef", "rope_theta", "clip_qkv",
                     "router_jitter_noise", "attention_dropout", "rope_parameters.rope_theta"), "a number"),
    **dict.fromkeys(("norm_topk_prob", "qkv_bias", "tie_word_embeddings", "use_sliding_window", "attention_bias"),
                    "true or false"),
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


def read_hf_config(directory: str | Path) -> tuple[Family, dict, Path]:
    """(family, config.json's contents, its path); ConfigError for an unreadable file or another model_type."""
    path = Path(directory) / HF_CONFIG
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"config: {path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path}: expected a JSON object, got {type(data).__name__}")
    model_type = data.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(f"config: {path}: model_type = {json.dumps(model_type)} is not supported "
                          f"(supported: {', '.join(FAMILIES)})")
    return FAMILIES[model_type], data, path


def _check_kinds(data: dict, path: Path) -> None:
    """ConfigError naming the first value of another JSON type than moe_dist reads it as (VALUE_KINDS)."""
    values = {key: data.get(key) for key in VALUE_KINDS}
    if isinstance(data.get("rope_parameters"), dict):  # where transformers 5 keeps rope_theta
        values["rope_parameters.rope_theta"] = data["rope_parameters"].get("rope_theta")
    for key, value in values.items():
        if value is not None and not IS_KIND[VALUE_KINDS[key]](value):
            raise ConfigError(f"config: {path}: {key} = {json.dumps(value)} must be {VALUE_KINDS[key]}")


def _refusal(data: dict, path: Path, key: str, why: str) -> ConfigError:
    return ConfigError(f"config: {path}: {key} = {json.dumps(data.get(key))} is not supported ({why})")


def _check_attention(family: Family, data: dict, path: Path) -> None:
    """Refuse the attention features moe_dist lacks, naming the key."""
    def refuse_if(bad: bool, key: str, why: str) -> None:
        if bad:
            raise _refusal(data, path, key, why)

    refuse_if(data.get("sliding_window") is not None and family.model_type == "mixtral", "sliding_window",
              "moe_dist attends over the whole sequence")
    refuse_if(bool(data.get("use_sliding_window")), "use_sliding_window", "moe_dist attends over the whole sequence")
    refuse_if(any(t != "full_attention" for t in data.get("layer_types") or []), "layer_types",
              "moe_dist has full attention in every layer")
    refuse_if(bool(data.get("tie_word_embeddings", False)), "tie_word_embeddings",
              "moe_dist's embedding and output head are separate")
    refuse_if(data.get("hidden_act", "silu") != "silu", "hidden_act", "the experts are SwiGLU")
    refuse_if(bool(data.get("attention_bias", False)), "attention_bias",
              "moe_dist's attention output projection has no bias")
    for key in ("router_jitter_noise", "attention_dropout"):
        refuse_if(data.get(key, 0.0) not in (0, None), key, "moe_dist has no jitter or dropout; set it to 0")
    default_head = data["hidden_size"] // data["num_attention_heads"]
    refuse_if(family.model_type == "olmoe" and data.get("head_dim") not in (None, default_head), "head_dim",
              "OLMoE's k_norm is sized by hidden_size / num_attention_heads")
    # Named by the key that scales: transformers 4's rope_scaling, or transformers 5's rope_parameters.
    refuse_if(data.get("rope_scaling") is not None, "rope_scaling", "moe_dist's rotary embedding is unscaled")
    refuse_if((data.get("rope_parameters") or {}).get("rope_type", "default") != "default", "rope_parameters",
              "moe_dist's rotary embedding is unscaled")


def _family_values(family: Family, data: dict) -> dict[str, object]:
    """The moe_dist values of the family's own features."""
    values: dict[str, object] = {"moe.num_experts": data[family.num_experts_key],
                                 "moe.expert_hidden": data[family.expert_hidden_key]}
    if family.model_type == "mixtral":
        return {**values, "moe.renormalize": True}
    values["moe.renormalize"] = bool(data.get("norm_topk_prob", False))
    if family.model_type == "olmoe":
        return {**values, "model.qk_norm": "full", "model.clip_qkv": float(data.get("clip_qkv") or 0.0)}
    step = data.get("decoder_sparse_step", 1)  # layer i is sparse when (i + 1) % step == 0 ...
    values.update({"model.ffn_hidden": data["intermediate_size"], "moe.first_k_dense": step - 1,
                   "moe.every_n_layers": step, "moe.dense_layers": list(data.get("mlp_only_layers") or [])})
    if family.model_type == "qwen2_moe":
        return {**values, "model.qkv_bias": bool(data.get("qkv_bias", True)), "moe.shared_expert_gate": True,
                "moe.shared_expert_hidden": data["shared_expert_intermediate_size"]}
    return {**values, "model.qk_norm": "head"}


def hf_values(directory: str | Path) -> dict[str, object]:
    """Every model.* and moe.* value of the Hugging Face model in `directory`, as moe_dist overrides."""
    family, data, path = read_hf_config(directory)
    _check_kinds(data, path)
    if data.get(family.num_experts_key) is None and "num_local_experts" in data:  # Qwen3-MoE's alias, which
        data[family.num_experts_key] = data["num_local_experts"]  # transformers 5 writes for num_experts
    required = [*COMMON_KEYS, family.num_experts_key, family.expert_hidden_key, "router_aux_loss_coef"]
    required += [] if family.model_type == "olmoe" else ["num_key_value_heads"]  # OLMoE's default: the heads
    required += {"qwen2_moe": ["intermediate_size", "shared_expert_intermediate_size"],
                 "qwen3_moe": ["intermediate_size"]}.get(family.model_type, [])
    missing = [key for key in required if data.get(key) is None]
    if missing:
        raise ConfigError(f"config: {path}: missing {', '.join(missing)}")
    _check_attention(family, data, path)
    values = {**FIXED, **{ours: data[key] for key, ours in COMMON_KEYS.items()}, **_family_values(family, data)}
    values["model.n_kv_heads"] = data.get("num_key_value_heads") or data["num_attention_heads"]
    if data.get("head_dim") not in (None, data["hidden_size"] // data["num_attention_heads"]):
        values["model.head_dim"] = data["head_dim"]
    rope_theta = data.get("rope_theta", family.default_rope_theta)
    values["model.rope_theta"] = (data.get("rope_parameters") or {}).get("rope_theta", rope_theta)
    try:
        shape = load_config(None, {**values, "data.seq_len": 1, "parallel.ep": 1})
    except ConfigError as e:  # a value out of range, named by our key: name the file too
        raise ConfigError(str(e).replace("config: ", f"config: {path}: ", 1)) from None
    values["moe.aux_loss_coef"] = aux_loss_coef_from_hf(data["router_aux_loss_coef"], data["num_experts_per_tok"],
                                                        moe_layer_count(shape))
    return values


def config_from_hf(directory: str | Path, overrides: dict[str, object] | None = None) -> Config:
    """The moe_dist config of the Hugging Face model in `directory`, then `overrides` (e.g. data.seq_len)."""
    values = hf_values(directory)
    # The default sequence length, or the model's context where that is shorter.
    seq_len = min(DataConfig().seq_len, values["model.max_seq_len"])
    return load_config(None, {"data.seq_len": seq_len, **values, **(overrides or {})})


def with_init_from(name: str | None, overrides: dict[str, object]) -> Config:
    """The run's config when train.init_from names a model to start from: the TOML file, then the model and moe
    values of that model (its config.json, or a moe_dist export's config.toml), then the command line's
    overrides (which win: e.g. moe.capacity_factor)."""
    init_from = load_config(name, overrides, check=False).train.init_from  # checked with the model's values below
    if not init_from:
        return load_config(name, overrides)
    if is_native_export(init_from):
        saved = load_config(str(Path(init_from) / NATIVE_CONFIG))
        values = {f"{section}.{key}": value for section in ("model", "moe")
                  for key, value in asdict(getattr(saved, section)).items()}
    elif is_hf_dir(init_from):
        values = hf_values(init_from)
    else:
        raise ConfigError(f"config: train.init_from = {init_from!r} is neither a Hugging Face model dir ({HF_CONFIG}) "
                          f"nor a moe_dist export ({NATIVE_CONFIG} and model.safetensors)")
    return load_config(name, {**values, **overrides})


def family_of(cfg: Config) -> Family:
    """The family whose layout a model's features imply: each family has one attention and shared-expert form."""
    if cfg.model.qk_norm == "head":
        return FAMILIES["qwen3_moe"]
    if cfg.model.qk_norm == "full":
        return FAMILIES["olmoe"]
    return FAMILIES["qwen2_moe" if cfg.moe.shared_expert_gate else "mixtral"]


def family_blocker(cfg: Config, family: Family) -> str | None:
    """The config key that keeps the model from mapping onto `family`, as a phrase; None if it maps."""
    m, moe, name = cfg.model, cfg.moe, family.model_type
    all_moe = moe_layer_count(cfg) == m.n_layers
    wants_shared = name == "qwen2_moe"
    checks = [
        (moe.num_experts > 0, "moe.num_experts = 0 (a dense model)"),
        (moe.score_func == "softmax", f"moe.score_func = {moe.score_func!r} (transformers routes with softmax)"),
        (moe.topk_group == moe.n_group, f"moe.topk_group = {moe.topk_group} < moe.n_group = {moe.n_group} "
                                        f"(transformers routes over all experts)"),
        (moe.routed_scaling_factor == 1, f"moe.routed_scaling_factor = {moe.routed_scaling_factor} "
                                         f"(transformers does not scale the weights)"),
        (not moe.capacity_factor, f"moe.capacity_factor = {moe.capacity_factor} (transformers never drops tokens)"),
        (name != "mixtral" or moe.renormalize, "moe.renormalize = false (Mixtral renormalises the top-k weights)"),
        (bool(moe.shared_expert_hidden) == wants_shared and moe.shared_expert_gate == wants_shared,
         f"moe.shared_expert_hidden = {moe.shared_expert_hidden}, moe.shared_expert_gate = "
         f"{str(moe.shared_expert_gate).lower()} ({family.architecture} "
         f"{'has a gated shared expert' if wants_shared else 'has no shared expert'})"),
        (all_moe or name in ("qwen2_moe", "qwen3_moe"), f"{_dense_layers_key(cfg)} ({family.architecture} has no "
                                                        f"dense layers)"),
        (m.qk_norm == {"qwen3_moe": "head", "olmoe": "full"}.get(name, "none"),
         f"model.qk_norm = {m.qk_norm!r} (not {family.architecture}'s)"),
        (not m.qkv_bias or name == "qwen2_moe", f"model.qkv_bias = true ({family.architecture} has none)"),
        (not m.clip_qkv or name == "olmoe", f"model.clip_qkv = {m.clip_qkv} ({family.architecture} has none)"),
        (not m.head_dim or m.head_dim == m.dim // m.n_heads or name != "olmoe",
         f"model.head_dim = {m.head_dim} (OLMoE's is model.dim / model.n_heads)"),
    ]
    return next((phrase for ok, phrase in checks if not ok), None)


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


def hf_config(cfg: Config, family: Family, dtype: str, bos: int | None, eos: int | None,
              token_ids: dict[str, object] | None = None) -> dict:
    """config.json for the family's transformers class (checked with family_blocker first). Its special-token ids
    are `token_ids` exactly where given (source_token_ids), else `bos` and `eos`."""
    m, moe = cfg.model, cfg.moe
    out = {"architectures": [family.architecture], "model_type": family.model_type, "torch_dtype": dtype,
           **{key: getattr(getattr(cfg, ours.split(".")[0]), ours.split(".")[1]) for key, ours in COMMON_KEYS.items()},
           "num_key_value_heads": m.n_kv_heads, "head_dim": m.head_size, "rope_theta": m.rope_theta,
           family.num_experts_key: moe.num_experts, family.expert_hidden_key: moe.expert_hidden,
           "router_aux_loss_coef": aux_loss_coef_to_hf(moe.aux_loss_coef, moe.top_k, moe_layer_count(cfg)),
           "hidden_act": "silu", "attention_dropout": 0.0, "tie_word_embeddings": False, "use_cache": True,
           "output_router_logits": False,
           **({"bos_token_id": bos, "eos_token_id": eos} if token_ids is None else token_ids)}
    if family.model_type == "mixtral":
        return {**out, "sliding_window": None, "router_jitter_noise": 0.0}
    out["norm_topk_prob"] = moe.renormalize
    if family.model_type == "olmoe":
        return {**out, "attention_bias": False, "clip_qkv": m.clip_qkv or None}
    dense = [i for i in range(m.n_layers) if not is_moe_layer(i, moe)]
    out.update({"intermediate_size": m.ffn_hidden, "decoder_sparse_step": 1, "mlp_only_layers": dense,
                "use_sliding_window": False})
    if family.model_type == "qwen2_moe":
        return {**out, "qkv_bias": m.qkv_bias, "shared_expert_intermediate_size": moe.shared_expert_hidden}
    return {**out, "attention_bias": False}
