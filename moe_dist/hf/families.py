"""The Hugging Face families moe_dist expresses exactly: one entry each, side by side.

An MoE entry says how the family's config.json becomes moe_dist values (`values`), which moe_dist values it can
hold at all (`holds`: what export checks), the family's own config.json keys on export (`config`), and where its
checkpoint keeps each weight. A dense entry (Llama, Mistral, Qwen2, Qwen3) is a model to import dense or to upcycle
into an MoE (hf/upcycle.py); it is never an export target. What every family shares (sizes, rotary, tied embeddings,
the aux-loss coefficient) is mapped once in hf/config.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from moe_dist.config import Config
from moe_dist.model.transformer import is_moe_layer

Check = Callable[[Config], bool]
# config.json -> the attention kind of each layer as transformers applies it ("sliding_attention" slides when
# sliding_window is set); None: no layer slides, whatever sliding_window says.
WindowLayers = Callable[[dict], list[str] | None]


def _is(key: str, *allowed: object) -> tuple[str, Check]:
    """The family holds `key` only at one of `allowed`."""
    section, name = key.split(".")
    return key, lambda cfg: getattr(getattr(cfg, section), name) in allowed


def _all_moe(cfg: Config) -> bool:
    return all(is_moe_layer(i, cfg.moe) for i in range(cfg.model.n_layers))


def _leading_dense(cfg: Config) -> bool:
    """Dense layers, if any, come first and the rest are MoE (first_k_dense_replace)."""
    return all(is_moe_layer(i, cfg.moe) == (i >= cfg.moe.first_k_dense) for i in range(cfg.model.n_layers))


def _one_bias(cfg: Config) -> bool:
    """transformers' attention_bias puts biases on q, k, v and o together."""
    return cfg.model.qkv_bias == cfg.model.out_bias


def _shared_experts(cfg: Config) -> bool:
    """n_shared_experts experts of moe_intermediate_size each, fused into one ungated MLP."""
    moe = cfg.moe
    return moe.shared_expert_hidden % moe.expert_hidden == 0 and not moe.shared_expert_gate


# What a family holds unless its entry says otherwise: the plain Mixtral-like transformer.
PLAIN: dict[str, Check] = dict([
    _is("model.attention", "gqa"), _is("model.qk_norm", "none"), _is("model.qkv_bias", False),
    _is("model.out_bias", False), _is("model.clip_qkv", 0.0), _is("model.attention_sinks", False),
    _is("model.rope_interleave", False), _is("model.sliding_window", 0),
    ("model.rotary_dim", lambda cfg: cfg.model.rotary_dim in (0, cfg.model.head_size)),
    _is("moe.score_func", "softmax"), _is("moe.routed_scaling_factor", 1.0), _is("moe.shared_expert_hidden", 0),
    _is("moe.shared_expert_gate", False), _is("moe.router_bias", False), _is("moe.expert_biases", False),
    _is("moe.expert_act", "swiglu"), _is("moe.capacity_factor", 0.0),
    ("moe.topk_group", lambda cfg: cfg.moe.topk_group == cfg.moe.n_group),
    ("moe.dense_layers", _all_moe),
])
ANY: Check = lambda cfg: True  # noqa: E731
# (config.json key, whether config.json's value there is one moe_dist lacks, why): what an entry refuses, beyond the
# refusals every family shares (hf/config.py).
Refusal = tuple[str, Callable[[dict], bool], str]
SWIGLU: Refusal = ("hidden_act", lambda data: data.get("hidden_act", "silu") != "silu", "the experts are SwiGLU")


def _no_attention_bias(architecture: str) -> Refusal:
    return ("attention_bias", lambda data: bool(data.get("attention_bias")),
            f"{architecture}'s attention has no output bias here")


def _slides(data: dict, default: Callable[[int], bool]) -> list[str]:
    """config.json's layer_types, else the family's own default: layer i slides where default(i)."""
    return data.get("layer_types") or ["sliding_attention" if default(i) else "full_attention"
                                       for i in range(data["num_hidden_layers"])]


def _every_layer(data: dict) -> list[str]:
    return _slides(data, lambda i: True)


def _when_used(layers: WindowLayers) -> WindowLayers:
    """The Qwen families: no window without use_sliding_window."""
    return lambda data: layers(data) if data.get("use_sliding_window") else None


def _from_max_window_layers(data: dict) -> list[str]:
    """Qwen2's and Qwen3's default: the layers from max_window_layers on slide."""
    return _slides(data, lambda i: i >= data.get("max_window_layers", 28))


def _window_in_every_layer(cfg: Config) -> dict[str, object]:
    """config.json's sliding window, for a family that slides in every layer (Mixtral)."""
    return {"sliding_window": cfg.model.sliding_window or None}


def _window_when_used(cfg: Config) -> dict[str, object]:
    return {"use_sliding_window": bool(cfg.model.sliding_window), **_window_in_every_layer(cfg)}


def _window_by_layer(cfg: Config) -> dict[str, object]:
    """The window and layer_types: every layer slides but model.full_attention_layers (gpt-oss)."""
    m = cfg.model
    layers = ["sliding_attention" if m.sliding_window and i not in m.full_attention_layers else "full_attention"
              for i in range(m.n_layers)]
    return {**_window_in_every_layer(cfg), "layer_types": layers}


def _qwen2_window(cfg: Config) -> dict[str, object]:
    return {**_window_by_layer(cfg), "use_sliding_window": bool(cfg.model.sliding_window),
            "max_window_layers": cfg.model.n_layers}


@dataclass(frozen=True)
class Family:
    """One transformers MoE family."""

    model_type: str
    architecture: str
    num_experts_key: str
    expert_hidden_key: str
    default_rope_theta: float  # transformers' value when config.json has none
    values: Callable[[dict], dict[str, object]]  # config.json -> the family's own moe_dist values
    config: Callable[[Config], dict[str, object]]  # moe_dist config -> the family's own config.json keys
    holds: dict[str, Check]  # moe_dist key -> whether the family can hold the config's value (beyond PLAIN)
    # config.json keys the family cannot do without, beyond the common ones (num_key_value_heads: all but OLMoE's,
    # whose default is the heads)
    required: tuple[str, ...] = ()
    default_rope: dict = field(default_factory=dict)  # transformers' rope_parameters when config.json has none
    aliases: tuple[str, ...] = ()  # other model_types of the same architecture (Kimi K2's kimi_k2)
    # Where its checkpoint keeps the MoE weights, under model.layers.<i>.
    moe_block: str = "mlp"
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # per-expert (gate, up, down)
    router: str = "gate"
    correction_bias: str | None = None  # e_score_correction_bias under the MoE block, if the family has one
    shared: str = "shared_expert"
    interleaved_experts: bool = False  # gpt-oss: gate_up_proj [E, D, 2H], gate and up alternating, with biases
    window_layers: WindowLayers = _every_layer  # which layers slide, as transformers applies sliding_window
    refuses: tuple[Refusal, ...] = (SWIGLU,)
    window_config: Callable[[Config], dict[str, object]] = lambda cfg: {}  # config.json's window keys on export

    def check(self, cfg: Config) -> tuple[str, Check] | None:
        """The first (key, check) of the family that `cfg` fails; None if the family holds it."""
        checks = {**PLAIN, **self.holds}
        return next(((key, ok) for key, ok in checks.items() if not ok(cfg)), None)


def _renormalize(data: dict, default: bool = False) -> dict[str, object]:
    return {"moe.renormalize": bool(data.get("norm_topk_prob", default))}


def _qwen_dense(data: dict) -> dict[str, object]:
    step = data.get("decoder_sparse_step", 1)  # layer i is sparse when (i + 1) % step == 0 ...
    return {"model.ffn_hidden": data["intermediate_size"], "moe.first_k_dense": step - 1,
            "moe.every_n_layers": step, "moe.dense_layers": list(data.get("mlp_only_layers") or [])}


def _qwen_dense_config(cfg: Config) -> dict[str, object]:
    dense = [i for i in range(cfg.model.n_layers) if not is_moe_layer(i, cfg.moe)]
    return {"intermediate_size": cfg.model.ffn_hidden, "decoder_sparse_step": 1, "mlp_only_layers": dense}


def _attention_bias(data: dict, default: bool = False) -> dict[str, object]:
    bias = bool(data.get("attention_bias", default))
    return {"model.qkv_bias": bias, "model.out_bias": bias}


def _correction_bias_routing(data: dict, groups: bool = True) -> dict[str, object]:
    """Sigmoid scores, chosen with the checkpoint's e_score_correction_bias: our aux-free selection bias."""
    values = {"moe.score_func": "sigmoid", "moe.aux_free_bias": True}
    if groups:
        values.update({"moe.n_group": data.get("n_group", 1), "moe.topk_group": data.get("topk_group", 1),
                       "moe.routed_scaling_factor": float(data.get("routed_scaling_factor", 1.0))})
    return values


def _deepseek_moe(data: dict, first_k_dense_default: int) -> dict[str, object]:
    """DeepSeek-V3 and GLM-4.5: leading dense layers, n_shared_experts ungated shared experts, no balance loss."""
    return {"model.ffn_hidden": data["intermediate_size"],
            "moe.first_k_dense": data.get("first_k_dense_replace", first_k_dense_default),
            "moe.shared_expert_hidden": data.get("n_shared_experts", 1) * data["moe_intermediate_size"],
            "moe.aux_loss_coef": 0.0, **_renormalize(data, True)}


def _deepseek_moe_config(cfg: Config) -> dict[str, object]:
    moe = cfg.moe
    return {"intermediate_size": cfg.model.ffn_hidden, "first_k_dense_replace": moe.first_k_dense,
            "n_shared_experts": moe.shared_expert_hidden // moe.expert_hidden, "norm_topk_prob": moe.renormalize,
            "n_group": moe.n_group, "topk_group": moe.topk_group, "routed_scaling_factor": moe.routed_scaling_factor}


SIGMOID_WITH_BIAS = dict([_is("moe.score_func", "sigmoid"), ("moe.routed_scaling_factor", ANY)])
DEEPSEEK_MOE = {**SIGMOID_WITH_BIAS, "moe.topk_group": ANY, "moe.shared_expert_hidden": _shared_experts,
                "moe.shared_expert_gate": _shared_experts, "moe.dense_layers": _leading_dense}


def _mla(data: dict) -> dict[str, object]:
    return {"model.attention": "mla", "model.q_lora_rank": data.get("q_lora_rank") or 0,
            "model.kv_lora_rank": data["kv_lora_rank"], "model.qk_nope_head_dim": data["qk_nope_head_dim"],
            "model.qk_rope_head_dim": data["qk_rope_head_dim"], "model.v_head_dim": data["v_head_dim"],
            "model.rope_interleave": bool(data.get("rope_interleave", True)),
            "model.n_kv_heads": data["num_attention_heads"]}


def _mla_config(cfg: Config) -> dict[str, object]:
    m = cfg.model
    return {"q_lora_rank": m.q_lora_rank or None, "kv_lora_rank": m.kv_lora_rank,
            "qk_nope_head_dim": m.qk_nope_head_dim, "qk_rope_head_dim": m.qk_rope_head_dim,
            "v_head_dim": m.v_head_dim, "rope_interleave": m.rope_interleave, "attention_bias": False,
            "num_key_value_heads": m.n_heads}


FAMILIES_LIST = (
    Family("mixtral", "MixtralForCausalLM", "num_local_experts", "intermediate_size", 1e6,
           values=lambda data: {"moe.renormalize": True},
           config=lambda cfg: {"router_jitter_noise": 0.0},
           holds=dict([_is("moe.renormalize", True), ("model.sliding_window", ANY)]),
           moe_block="block_sparse_moe", expert_names=("w1", "w3", "w2"), window_config=_window_in_every_layer,
           required=("num_key_value_heads",)),
    Family("qwen2_moe", "Qwen2MoeForCausalLM", "num_experts", "moe_intermediate_size", 1e4,
           values=lambda data: {**_renormalize(data), **_qwen_dense(data),
                                "model.qkv_bias": bool(data.get("qkv_bias", True)), "moe.shared_expert_gate": True,
                                "moe.shared_expert_hidden": data["shared_expert_intermediate_size"]},
           config=lambda cfg: {"norm_topk_prob": cfg.moe.renormalize, **_qwen_dense_config(cfg),
                               "qkv_bias": cfg.model.qkv_bias,
                               "shared_expert_intermediate_size": cfg.moe.shared_expert_hidden},
           holds={"model.qkv_bias": ANY, "moe.shared_expert_hidden": lambda cfg: cfg.moe.shared_expert_hidden > 0,
                  "moe.shared_expert_gate": lambda cfg: cfg.moe.shared_expert_gate, "moe.dense_layers": ANY,
                  "model.sliding_window": ANY},
           required=("intermediate_size", "shared_expert_intermediate_size", "num_key_value_heads"),
           window_layers=_when_used(lambda data: _slides(data, lambda i: i % 2 == 0
                                                         and i < data.get("max_window_layers", 28))),
           window_config=_qwen2_window),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", "num_experts", "moe_intermediate_size", 1e4,
           values=lambda data: {**_renormalize(data), **_qwen_dense(data), **_attention_bias(data),
                                "model.qk_norm": "head"},
           config=lambda cfg: {"norm_topk_prob": cfg.moe.renormalize, **_qwen_dense_config(cfg),
                               "attention_bias": cfg.model.qkv_bias},
           holds=dict([_is("model.qk_norm", "head"), ("model.qkv_bias", _one_bias), ("model.out_bias", _one_bias),
                       ("moe.dense_layers", ANY), ("model.sliding_window", ANY)]),
           required=("intermediate_size", "num_key_value_heads"), window_layers=_when_used(_every_layer),
           window_config=_window_when_used),
    Family("olmoe", "OlmoeForCausalLM", "num_experts", "intermediate_size", 1e4,
           values=lambda data: {**_renormalize(data), **_attention_bias(data), "model.qk_norm": "full",
                                "model.clip_qkv": float(data.get("clip_qkv") or 0.0)},
           config=lambda cfg: {"norm_topk_prob": cfg.moe.renormalize, "attention_bias": cfg.model.qkv_bias,
                               "clip_qkv": cfg.model.clip_qkv or None},
           holds=dict([_is("model.qk_norm", "full"), ("model.qkv_bias", _one_bias), ("model.out_bias", _one_bias),
                       ("model.clip_qkv", ANY),
                       ("model.head_dim", lambda cfg: cfg.model.head_size == cfg.model.dim // cfg.model.n_heads)]),
           refuses=(SWIGLU, ("head_dim", lambda data: data.get("head_dim") not in (
               None, data["hidden_size"] // data["num_attention_heads"]),
               "OLMoE's k_norm is sized by hidden_size / num_attention_heads"))),
    Family("deepseek_v3", "DeepseekV3ForCausalLM", "n_routed_experts", "moe_intermediate_size", 1e4,
           values=lambda data: {**_mla(data), **_correction_bias_routing(data), **_deepseek_moe(data, 3)},
           config=lambda cfg: {**_mla_config(cfg), **_deepseek_moe_config(cfg)},
           holds={**DEEPSEEK_MOE, **dict([_is("model.attention", "mla"), ("model.rope_interleave", ANY)])},
           required=("intermediate_size", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "num_key_value_heads"),
           aliases=("kimi_k2",), correction_bias="gate.e_score_correction_bias", shared="shared_experts",
           refuses=(SWIGLU, _no_attention_bias("DeepseekV3ForCausalLM"))),
    Family("glm4_moe", "Glm4MoeForCausalLM", "n_routed_experts", "moe_intermediate_size", 1e4,
           values=lambda data: {**_correction_bias_routing(data), **_deepseek_moe(data, 1),
                                "model.qkv_bias": bool(data.get("attention_bias", False)),
                                "model.qk_norm": "head" if data.get("use_qk_norm") else "none"},
           config=lambda cfg: {**_deepseek_moe_config(cfg), "attention_bias": cfg.model.qkv_bias,
                               "use_qk_norm": cfg.model.qk_norm == "head"},
           holds={**DEEPSEEK_MOE, **dict([_is("model.qk_norm", "none", "head"), ("model.qkv_bias", ANY),
                                          ("model.rotary_dim", ANY)])},
           required=("intermediate_size", "num_key_value_heads"), default_rope={"partial_rotary_factor": 0.5},
           correction_bias="gate.e_score_correction_bias", shared="shared_experts"),
    Family("gpt_oss", "GptOssForCausalLM", "num_local_experts", "intermediate_size", 150000.0,
           values=lambda data: {**_attention_bias(data, True), "model.attention_sinks": True,
                                "moe.renormalize": True, "moe.router_bias": True, "moe.expert_biases": True,
                                "moe.expert_act": "clamped_swiglu",
                                "moe.swiglu_alpha": float(data.get("swiglu_alpha", 1.702)),
                                "moe.swiglu_limit": float(data.get("swiglu_limit", 7.0))},
           config=lambda cfg: {"attention_bias": cfg.model.qkv_bias, "swiglu_alpha": cfg.moe.swiglu_alpha,
                               "swiglu_limit": cfg.moe.swiglu_limit},
           holds=dict([_is("model.attention_sinks", True), _is("model.qkv_bias", True), _is("model.out_bias", True),
                       _is("moe.renormalize", True), _is("moe.router_bias", True), _is("moe.expert_biases", True),
                       _is("moe.expert_act", "clamped_swiglu"), ("model.sliding_window", ANY)]),
           default_rope={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 4096},
           router="router", interleaved_experts=True, window_layers=lambda data: _slides(data, lambda i: i % 2 == 0),
           window_config=_window_by_layer, required=("num_key_value_heads",),
           refuses=()),  # its config.json's hidden_act names an activation it lacks
    Family("minimax_m2", "MiniMaxM2ForCausalLM", "num_local_experts", "intermediate_size", 5e6,
           values=lambda data: {**_correction_bias_routing(data, groups=False), "moe.renormalize": True,
                                "model.qk_norm": "full"},
           config=lambda cfg: {"router_jitter_noise": 0.0, "rotary_dim": cfg.model.rotary_dim or cfg.model.head_size},
           holds={**SIGMOID_WITH_BIAS, **dict([_is("model.qk_norm", "full"), _is("moe.renormalize", True),
                                               _is("moe.routed_scaling_factor", 1.0), ("model.rotary_dim", ANY)])},
           moe_block="block_sparse_moe", expert_names=("w1", "w3", "w2"), correction_bias="e_score_correction_bias",
           required=("num_key_value_heads",), refuses=(SWIGLU, _no_attention_bias("MiniMaxM2ForCausalLM"),
                    ("scoring_func", lambda data: data.get("scoring_func", "sigmoid") != "sigmoid",
                     "MiniMax-M2 scores experts with sigmoid"))),
)
FAMILIES = {f.model_type: f for f in FAMILIES_LIST}


@dataclass(frozen=True)
class DenseFamily:
    """One transformers dense family: imported as a dense model, or upcycled into an MoE (hf/upcycle.py)."""

    model_type: str
    architecture: str
    default_rope_theta: float  # transformers' value when config.json has none
    values: Callable[[dict], dict[str, object]]  # config.json -> the family's own model.* values
    required: tuple[str, ...]  # config.json keys the family cannot do without, beyond the common ones
    window_layers: WindowLayers = _every_layer  # which layers slide, as transformers applies sliding_window
    default_rope: dict = field(default_factory=dict)  # transformers' rope_parameters when config.json has none
    aliases: tuple[str, ...] = ()  # other model_types of the same architecture
    refuses: tuple[Refusal, ...] = (SWIGLU,)


def _dense_mlp(data: dict) -> dict[str, object]:
    return {"model.ffn_hidden": data["intermediate_size"]}


DENSE_FAMILIES = (
    # Llama's num_key_value_heads defaults to its heads; attention_bias puts biases on q, k, v and o.
    DenseFamily("llama", "LlamaForCausalLM", 1e4, values=lambda data: {**_dense_mlp(data), **_attention_bias(data)},
                required=("intermediate_size",)),
    # Mistral: no biases, one window in every layer (transformers ignores its layer_types).
    DenseFamily("mistral", "MistralForCausalLM", 1e4, values=_dense_mlp,
                required=("intermediate_size", "num_key_value_heads"),
                window_layers=lambda data: ["sliding_attention"] * data["num_hidden_layers"]),
    # Qwen2: q, k and v always biased, o never.
    DenseFamily("qwen2", "Qwen2ForCausalLM", 1e4, values=lambda data: {**_dense_mlp(data), "model.qkv_bias": True},
                required=("intermediate_size", "num_key_value_heads"),
                window_layers=_when_used(_from_max_window_layers)),
    # Qwen3: attention_bias on q, k, v and o, per-head QK-norm, heads of 128 unless head_dim says otherwise.
    DenseFamily("qwen3", "Qwen3ForCausalLM", 1e4,
                values=lambda data: {**_dense_mlp(data), **_attention_bias(data), "model.qk_norm": "head",
                                     "model.head_dim": data.get("head_dim") or 128},
                required=("intermediate_size", "num_key_value_heads"),
                window_layers=_when_used(_from_max_window_layers)),
)
MODEL_TYPES: dict[str, Family | DenseFamily] = {name: f for f in (*FAMILIES_LIST, *DENSE_FAMILIES)
                                                for name in (f.model_type, *f.aliases)}
# Families transformers has and moe_dist does not express yet, and why: refused by model_type.
NOT_YET = {"qwen3_next": "hybrid linear attention", "qwen3_5_moe": "hybrid linear attention",
           "deepseek_v32": "DeepSeek sparse attention", "kimi_linear": "hybrid linear attention"}
