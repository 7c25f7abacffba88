"""Dataclass configs, TOML loading, dotted command-line overrides and validation."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A bad config value; its message is one line naming the key and what is allowed."""


def num(default: int | float, interval: str) -> object:
    """A numeric field and its allowed values, as an interval: "[1, inf)", "(0, 1]", "[0, 1)"."""
    return field(default=default, metadata={"interval": interval})


@dataclass
class ModelConfig:
    vocab_size: int = num(4096, "[1, inf)")
    dim: int = num(128, "[1, inf)")
    n_layers: int = num(4, "[1, inf)")
    n_heads: int = num(4, "[1, inf)")
    n_kv_heads: int = num(2, "[1, inf)")
    ffn_hidden: int = num(384, "[1, inf)")  # dense SwiGLU hidden size
    max_seq_len: int = num(128, "[1, inf)")
    rope_theta: float = num(10000.0, "(0, inf)")
    norm_eps: float = num(1e-5, "(0, inf)")
    init_std: float = num(0.02, "(0, inf)")
    head_dim: int = num(0, "[0, inf)")  # 0 = dim / n_heads
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2-MoE)
    qk_norm: str = "none"  # none | head: RMSNorm per head on q and k (Qwen3) | full: over the whole projection (OLMoE)
    clip_qkv: float = num(0.0, "[0, inf)")  # clamp q, k and v to [-clip_qkv, clip_qkv] (OLMoE); 0 = off
    out_bias: bool = False  # a bias on the attention output projection (gpt-oss)
    attention_sinks: bool = False  # a learned logit per head that joins every softmax and takes no value (gpt-oss)
    sliding_window: int = num(0, "[0, inf)")  # a query sees its last sliding_window keys, itself included; 0 = all
    full_attention_layers: list[int] = field(default_factory=list)  # layers that ignore sliding_window
    tie_embeddings: bool = False  # the output head is the embedding matrix
    # Rotary embedding: on the first rotary_dim dims of each head (0 = all of them: partial rotary), in halves
    # (x_i, x_{i + d/2}) or, with rope_interleave, in adjacent pairs (x_2i, x_2i+1); scaled as rope_scaling says.
    rotary_dim: int = num(0, "[0, inf)")
    rope_interleave: bool = False
    rope_scaling: str = "none"  # none | linear | llama3 | yarn
    rope_factor: float = num(1.0, "(0, inf)")  # how many times the original context the scaled rotary covers
    rope_original_max_seq_len: int = num(0, "[0, inf)")  # llama3, yarn: the context before scaling
    rope_low_freq_factor: float = num(1.0, "(0, inf)")  # llama3
    rope_high_freq_factor: float = num(4.0, "(0, inf)")  # llama3
    rope_beta_fast: float = num(32.0, "(0, inf)")  # yarn: the ramp between extrapolated and interpolated dims
    rope_beta_slow: float = num(1.0, "(0, inf)")  # yarn
    rope_truncate: bool = True  # yarn: the ramp's ends rounded to whole dims
    rope_mscale: float = num(0.0, "[0, inf)")  # yarn: with rope_mscale_all_dim, DeepSeek's attention factor
    rope_mscale_all_dim: float = num(0.0, "[0, inf)")  # yarn: and the softmax scale's mscale(factor)^2 (MLA)
    rope_attention_factor: float = num(0.0, "[0, inf)")  # yarn: cos and sin scaled by it; 0 = from the factor
    # Multi-head latent attention (DeepSeek-V3) instead of grouped-query attention: q through a q_lora_rank
    # bottleneck (0 = a full projection), keys and values from a shared kv_lora_rank latent, heads of
    # qk_nope_head_dim + qk_rope_head_dim for q and k (rotary on the second part only) and v_head_dim for v.
    attention: str = "gqa"  # gqa | mla
    q_lora_rank: int = num(0, "[0, inf)")
    kv_lora_rank: int = num(512, "[1, inf)")
    qk_nope_head_dim: int = num(128, "[0, inf)")
    qk_rope_head_dim: int = num(64, "[2, inf)")
    v_head_dim: int = num(128, "[1, inf)")

    @property
    def head_size(self) -> int:
        return self.head_dim or self.dim // self.n_heads


@dataclass
class MoEConfig:
    num_experts: int = num(8, "[0, inf)")
    top_k: int = num(2, "[1, inf)")
    expert_hidden: int = num(192, "[1, inf)")
    score_func: str = "softmax"  # softmax | sigmoid
    renormalize: bool = True  # renormalise the k combine weights to sum to 1
    every_n_layers: int = num(1, "[1, inf)")  # MoE in every n-th layer after the first `first_k_dense` ...
    first_k_dense: int = num(0, "[0, inf)")  # ... dense layers; num_experts = 0 makes every layer dense
    aux_loss_coef: float = num(0.01, "[0, inf)")  # Switch/GShard load-balancing loss
    z_loss_coef: float = num(0.001, "[0, inf)")
    aux_free_bias: bool = False  # auxiliary-loss-free balancing (per-expert selection bias)
    bias_update_rate: float = num(0.001, "[0, inf)")
    capacity_factor: float = num(0.0, "[0, inf)")  # 0 = dropless; else tokens per expert per sequence are capped
    shared_expert_hidden: int = num(0, "[0, inf)")  # 0 = no shared expert
    shared_expert_gate: bool = False  # the shared expert's output scaled by sigmoid(x . w) per token (Qwen2-MoE)
    router_bias: bool = False  # a bias on the router's logits (gpt-oss)
    expert_biases: bool = False  # biases on the experts' projections (gpt-oss)
    # The experts' activation: swiglu, silu(x w1) * (x w3); or clamped_swiglu (gpt-oss), with g = min(x w1, limit)
    # and u = clamp(x w3, -limit, limit): g * sigmoid(swiglu_alpha * g) * (u + 1).
    expert_act: str = "swiglu"  # swiglu | clamped_swiglu
    swiglu_alpha: float = num(1.702, "(0, inf)")
    swiglu_limit: float = num(7.0, "(0, inf)")
    dense_layers: list[int] = field(default_factory=list)  # layers kept dense whatever the pattern above
    # DeepSeek-V3 routing: experts in n_group equal groups, a token routed within its topk_group best groups
    # (with EP groups aligned to ranks, node-limited routing); combine weights scaled by routed_scaling_factor.
    n_group: int = num(1, "[1, inf)")
    topk_group: int = num(1, "[1, inf)")
    routed_scaling_factor: float = num(1.0, "(0, inf)")
    seq_aux_loss_coef: float = num(0.0, "[0, inf)")  # the load-balancing loss per sequence, averaged
    grouped_mm_backend: str = "auto"  # auto | grouped_mm | padded | loop


@dataclass
class ParallelConfig:
    ep: int = num(1, "[0, inf)")  # expert-parallel degree; 0 = auto: gcd(world size, num_experts)
    dp_shard: int = num(-1, "[-1, inf)")  # -1 = world // ep
    # Each MoE layer's tokens in this many chunks, whose all-to-alls overlap the experts' compute; 0 = auto:
    # on CPU one per 2 MiB of rows a rank sends, at most 4; on GPUs 1 until measured (parallel/expert_parallel.py).
    ep_chunks: int = num(0, "[0, inf)")
    activation_checkpoint: bool = False
    compile: bool = False
    param_dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16
    reduce_dtype: str = "float32"


@dataclass
class MixtureSource:
    """One prepared dataset of a mixture and its weight (relative: the weights are normalised)."""

    path: str
    weight: float
    name: str = ""  # in metrics; "" = the directory's name

    @property
    def label(self) -> str:
        """Its name in metrics and checkpoints."""
        return self.name or Path(self.path).name


@dataclass
class DataConfig:
    path: str = ""  # directory written by moe_dist.data.prep; "" = the built-in default corpus
    # Several prepared directories instead of data.path, each filling its weight's share of every global batch:
    # in TOML [{path = "web", weight = 3}, ...], on the command line web=3,code=1
    mixture: list[MixtureSource] = field(default_factory=list)
    seq_len: int = num(128, "[1, inf)")
    micro_batch: int = num(4, "[1, inf)")  # sequences per rank per micro-step
    val_fraction: float = num(0.02, "[0, 1)")
    text_field: str = "text"
    seed: int = num(1234, "[0, inf)")
    document_mask: bool = False  # attention within each document of a packed window; no loss across a boundary
    restart_positions: bool = False  # with document_mask: rotary positions restart at every document


@dataclass
class OptimConfig:
    # adamw: AdamW on every parameter. muon: Muon on the blocks' hidden matrices (each expert's separately), its
    # update scaled to AdamW's RMS so that lr and weight_decay carry over; AdamW, as configured here, on the rest.
    name: str = "adamw"  # adamw | muon
    lr: float = num(3e-3, "(0, 1]")  # AdamW's step is about lr per weight: beyond 1 is a typo, not a setting
    min_lr_ratio: float = num(0.1, "[0, 1]")
    warmup_steps: int = num(10, "[0, inf)")
    weight_decay: float = num(0.1, "[0, inf)")
    beta1: float = num(0.9, "[0, 1)")
    beta2: float = num(0.95, "[0, 1)")
    eps: float = num(1e-8, "(0, inf)")
    grad_clip: float = num(1.0, "[0, inf)")  # 0 = off
    momentum: float = num(0.95, "[0, 1)")  # Muon's (Nesterov) momentum
    ns_steps: int = num(5, "[1, 99]")  # Muon's Newton-Schulz iterations
    # After the warmup: cosine or linear to min_lr_ratio at train.steps; constant at 1; wsd (warmup-stable-decay)
    # at 1, then decay_shape down to min_lr_ratio over the last decay_steps (0 = decay_fraction of train.steps).
    schedule: str = "cosine"  # cosine | wsd | linear | constant
    decay_steps: int = num(0, "[0, inf)")
    decay_fraction: float = num(0.2, "(0, 1]")
    decay_shape: str = "linear"  # linear | cosine | 1-sqrt

    def decay_length(self, total_steps: int) -> int:
        """wsd: the decay's steps at train.steps = total_steps."""
        return self.decay_steps or max(1, round(self.decay_fraction * total_steps))


@dataclass
class TrainConfig:
    name: str = "tiny"  # the run dir is metrics.runs_dir / name: a plain name, not a path
    # a Hugging Face model dir to start from: its config.json sets model and moe, its safetensors the weights
    init_from: str = ""
    # with init_from a dense model and moe.num_experts > 0 (upcycling): Gaussian noise of this times the RMS of the
    # dense weight an expert copies (w2 as copied: times its segments) added to the copy; 0 = exact copies
    upcycle_noise: float = num(0.0, "[0, inf)")
    # A new run that starts where another run's checkpoint is (model, optimizer, schedule step, data position), with
    # this config: a checkpoint dir (runs/<run>/checkpoints/step-N) or a run dir (its latest checkpoint).
    branch_from: str = ""
    steps: int = num(100, "[1, inf)")  # the schedule's length
    # stop (checkpointed) at this step, e.g. to fit a job's time limit; 0 = at train.steps
    stop_after: int = num(0, "[0, inf)")
    grad_accum: int = num(1, "[1, inf)")
    seed: int = num(0, "[0, inf)")
    eval_interval: int = num(50, "[0, inf)")  # 0 = only at the end
    eval_steps: int = num(4, "[1, inf)")
    device: str = "auto"  # auto | cpu | cuda
    # a non-finite loss or gradient skips the step; this many in a row stop the run
    max_nonfinite_steps: int = num(5, "[1, inf)")


@dataclass
class CheckpointConfig:
    interval: int = num(0, "[0, inf)")  # 0 = only at the end
    keep_last: int = num(2, "[1, inf)")
    resume: str = ""  # "" | auto (newest checkpoint that verifies, falling back to older ones)
    async_save: bool = False


@dataclass
class MetricsConfig:
    log_interval: int = num(10, "[1, inf)")
    runs_dir: str = "runs"  # where run dirs live (any path)
    tensorboard: bool = False  # also write runs/<name>/tensorboard (needs the tensorboard package)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


CHOICES = {
    "model.qk_norm": ("none", "head", "full"),
    "model.attention": ("gqa", "mla"),
    "model.rope_scaling": ("none", "linear", "llama3", "yarn"),
    "moe.expert_act": ("swiglu", "clamped_swiglu"),
    "moe.score_func": ("softmax", "sigmoid"),
    "moe.grouped_mm_backend": ("auto", "grouped_mm", "padded", "loop"),
    "parallel.param_dtype": ("auto", "float32", "bfloat16"),
    "parallel.reduce_dtype": ("float32", "bfloat16"),
    "optim.name": ("adamw", "muon"),
    "optim.schedule": ("cosine", "wsd", "linear", "constant"),
    "optim.decay_shape": ("linear", "cosine", "1-sqrt"),
    "train.device": ("auto", "cpu", "cuda"),
    "checkpoint.resume": ("", "auto"),
}


def _field_types(section_cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _coerce(key: str, value: object, typ: type) -> object:
    """Check or convert one value (TOML value or command-line string) to the field's type."""
    from_cli = isinstance(value, str) and typ is not str
    if typ is bool:
        if from_cli and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, bool):
            return value
    elif typ is int:
        if from_cli:
            try:
                return int(value)
            except ValueError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if from_cli:
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str and isinstance(value, str):
        return value
    elif typ == list[MixtureSource]:
        return _mixture(key, value)
    elif typing.get_origin(typ) is list:  # list[int]: a TOML array, or "1,3" on the command line
        items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if isinstance(items, list):
            try:
                return [_coerce(key, v, int) for v in items]
            except ConfigError:
                pass
        raise ConfigError(f"config: {key} must be a list of int (e.g. 1,3), got {value!r}")
    raise ConfigError(f"config: {key} must be {typ.__name__}, got {value!r}")


def _mixture(key: str, value: object) -> list[MixtureSource]:
    """A TOML array of {path, weight[, name]} tables, or "path=weight,path=weight" on the command line."""
    example = f"config: {key} must be a list of {{path = ..., weight = ...}} tables (on the command line " \
              f"path=weight,path=weight), got {value!r}"
    if isinstance(value, str):
        pairs = [item.rpartition("=") for item in value.split(",") if item.strip()]
        if not all(eq and path for path, eq, _ in pairs):
            raise ConfigError(example)
        value = [{"path": path, "weight": weight} for path, _, weight in pairs]
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(example)
    sources = []
    for i, table in enumerate(value):
        unknown = set(table) - {"path", "weight", "name"}
        if unknown or "path" not in table or "weight" not in table:
            raise ConfigError(f"config: {key}[{i}] = {table!r} must have path and weight (and may have name)")
        sources.append(MixtureSource(_coerce(f"{key}[{i}].path", table["path"], str),
                                     _coerce(f"{key}[{i}].weight", table["weight"], float),
                                     _coerce(f"{key}[{i}].name", table.get("name", ""), str)))
    return sources


def _set(cfg: Config, key: str, value: object) -> None:
    section_name, _, name = key.partition(".")
    sections = [f.name for f in dataclasses.fields(Config)]
    if section_name not in sections or not name:
        raise ConfigError(f"config: unknown section in {key!r} (valid: {', '.join(sections)})")
    section = getattr(cfg, section_name)
    types_ = _field_types(type(section))
    if name not in types_:
        raise ConfigError(f"config: unknown key {key!r} (valid: {', '.join(types_)})")
    setattr(section, name, _coerce(key, value, types_[name]))


def resolve_config_path(name_or_path: str) -> Path:
    """`tiny` -> configs/tiny.toml; anything else is a path."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = CONFIG_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
        raise ConfigError(f"config: no such config {name_or_path!r} (known: {', '.join(known)})")
    return path


def load_config(name_or_path: str | None = None, overrides: dict[str, object] | None = None,
                check: bool = True) -> Config:
    """Defaults, then a TOML file, then dotted overrides; validated unless `check` is false (for a config that
    is only read, to be completed by more values)."""
    cfg = Config()
    if name_or_path:
        path = resolve_config_path(name_or_path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config: {path}: {e}") from None
        for section_name, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"config: {path}: top-level key {section_name!r} must be a [section]")
            for name, value in values.items():
                try:
                    _set(cfg, f"{section_name}.{name}", value)
                except ConfigError as e:  # name the file too
                    raise ConfigError(str(e).replace("config: ", f"config: {path}: ", 1)) from None
    for key, value in (overrides or {}).items():
        _set(cfg, key, value)
    if check:
        validate(cfg)
    return cfg


def parse_args(argv: list[str], program: str, options: dict[str, bool] | None = None
               ) -> tuple[str | None, dict[str, str], dict[str, str | bool]]:
    """Split argv into (--config value, {section.field: value}, {option: value, or True for a flag}).

    `options` names the program's own options, each mapped to whether it takes a value.
    """
    options = options or {}
    config_name, overrides, given = None, {}, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"{program}: unexpected argument {arg!r} (expected --section.field value)")
        key, eq, value = arg[2:].partition("=")
        if key != "config" and "." not in key and key not in options:
            known = ", ".join(f"--{name}" for name in ["config", *options, "section.field"])
            raise ConfigError(f"{program}: unknown option {arg!r} (options: {known})")
        takes_value = key == "config" or "." in key or options.get(key, False)
        if takes_value and not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"{program}: {arg} needs a value")
            value = argv[i + 1]
            i += 1
        if key == "config":
            config_name = value
        elif "." in key:
            overrides[key] = value
        else:
            given[key] = value if takes_value else True
        i += 1
    return config_name, overrides, given


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"config: {message}")


INT64_MAX = 2**63 - 1  # what TOML, torch and numpy can all hold
# Characters a run name may not hold: it names one directory under metrics.runs_dir.
NAME_FORBIDDEN = frozenset("/\\\0") | {chr(c) for c in range(32)}


def _interval_phrase(interval: str) -> tuple[float, float, bool, bool, str]:
    """"[1, inf)" -> (1, inf, lower closed, upper closed, ">= 1")."""
    lo_text, hi_text = (part.strip() for part in interval[1:-1].split(","))
    lo, hi = float(lo_text), float(hi_text)
    lo_closed, hi_closed = interval[0] == "[", interval[-1] == "]"
    if hi == float("inf"):
        phrase = f"{'>=' if lo_closed else '>'} {lo_text}"
    else:
        phrase = f"in {interval}"
    return lo, hi, lo_closed, hi_closed, phrase


def _check_numbers(cfg: Config) -> None:
    """Every numeric field within its declared interval, finite, and within 64 bits."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            if "interval" not in f.metadata:
                continue
            key, value = f"{section.name}.{f.name}", getattr(values, f.name)
            lo, hi, lo_closed, hi_closed, phrase = _interval_phrase(f.metadata["interval"])
            _check(math.isfinite(value), f"{key} = {value} must be finite and {phrase}")
            inside = (lo <= value if lo_closed else lo < value) and (value <= hi if hi_closed else value < hi)
            _check(inside, f"{key} = {value} must be {phrase}")
            # Inside an interval to inf, but no field means anything beyond 64 bits (1e308 passes as a float).
            bound = f"{INT64_MAX:,}" if isinstance(value, int) else f"{INT64_MAX:.3g}"
            _check(value <= INT64_MAX, f"{key} = {value} must be at most {bound} (valid: "
                                       f"{'[' if lo_closed else '('}{lo:g}, {bound}])")


def _check_run_name(name: str) -> None:
    _check(name != "" and not NAME_FORBIDDEN & set(name) and name[0] not in ".-_",
           f"train.name = {name!r} must be a plain name: not empty, no path separators or control characters, "
           f"not starting with '.', '-' or '_' (to put runs elsewhere, set metrics.runs_dir)")


def _check_schedule(cfg: Config) -> None:
    """The WSD decay fits after the warmup; a branch starts from its source's weights alone."""
    o, steps = cfg.optim, cfg.train.steps
    decay = (f"optim.decay_steps = {o.decay_steps}" if o.decay_steps
             else f"optim.decay_fraction = {o.decay_fraction} ({o.decay_length(steps)} steps)")
    _check(o.schedule != "wsd" or o.warmup_steps + o.decay_length(steps) <= steps,
           f"{decay} must fit in train.steps = {steps} after optim.warmup_steps = {o.warmup_steps}")
    _check(not (cfg.train.branch_from and cfg.train.init_from),
           "train.branch_from and train.init_from exclude each other: a branch starts from its source run's weights")


def _check_mixture(d: DataConfig) -> None:
    _check(not (d.path and d.mixture), "data.path and data.mixture exclude each other (a one-source mixture is "
                                       "data.mixture = [{path = ..., weight = 1}])")
    names = []
    for i, source in enumerate(d.mixture):
        _check(source.path != "", f"data.mixture[{i}].path must not be empty")
        _check(math.isfinite(source.weight) and source.weight > 0,
               f"data.mixture[{i}].weight = {source.weight} must be finite and > 0")
        names.append(source.label)
        _check(names[-1] not in names[:-1] and names[-1] not in ("", ".", ".."),
               f"data.mixture[{i}] is named {names[-1]!r}, as another source is (or not at all): give it a name "
               f"(name = ...)")


def validate(cfg: Config) -> None:
    """Reject bad values and impossible combinations with one line naming the key."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _check(value in allowed, f"{key} = {value!r} is not one of {', '.join(map(repr, allowed))}")
    _check_numbers(cfg)
    _check_run_name(cfg.train.name)
    m, moe, p = cfg.model, cfg.moe, cfg.parallel
    _check(m.head_dim > 0 or m.dim % m.n_heads == 0,
           f"model.n_heads = {m.n_heads} must divide model.dim = {m.dim} (or set model.head_dim)")
    _check(m.head_size % 2 == 0, f"the head size {m.head_size} (model.head_dim, or model.dim / model.n_heads) "
                                 f"must be even (rotary)")
    _check(m.rotary_dim <= m.head_size and m.rotary_dim % 2 == 0,
           f"model.rotary_dim = {m.rotary_dim} must be even and at most the head size {m.head_size}")
    _check(m.rope_scaling not in ("llama3", "yarn") or m.rope_original_max_seq_len > 0,
           f"model.rope_scaling = {m.rope_scaling!r} needs model.rope_original_max_seq_len > 0")
    _check(m.attention != "mla" or m.qk_rope_head_dim % 2 == 0,
           f"model.qk_rope_head_dim = {m.qk_rope_head_dim} must be even (rotary)")
    mla_lacks = {"model.qk_norm": m.qk_norm != "none", "model.qkv_bias": m.qkv_bias, "model.clip_qkv": m.clip_qkv,
                 "model.attention_sinks": m.attention_sinks, "model.rotary_dim": m.rotary_dim}
    lacking = next((key for key, on in mla_lacks.items() if on), None)
    _check(m.attention != "mla" or lacking is None,
           f"{lacking} is a grouped-query attention option; model.attention = 'mla' has none")
    _check(all(0 <= i < m.n_layers for i in m.full_attention_layers),
           f"model.full_attention_layers = {m.full_attention_layers} must hold layer numbers in "
           f"[0, model.n_layers = {m.n_layers})")
    _check(m.n_heads % m.n_kv_heads == 0,
           f"model.n_kv_heads = {m.n_kv_heads} must divide model.n_heads = {m.n_heads}")
    _check(cfg.data.seq_len <= m.max_seq_len,
           f"data.seq_len = {cfg.data.seq_len} exceeds model.max_seq_len = {m.max_seq_len}")
    if moe.num_experts > 0:
        _check(moe.top_k <= moe.num_experts,
               f"moe.top_k = {moe.top_k} must be between 1 and moe.num_experts = {moe.num_experts}")
        _check(moe.num_experts % moe.n_group == 0,
               f"moe.n_group = {moe.n_group} must divide moe.num_experts = {moe.num_experts}")
        _check(moe.topk_group <= moe.n_group,
               f"moe.topk_group = {moe.topk_group} must be between 1 and moe.n_group = {moe.n_group}")
        _check(moe.top_k <= moe.topk_group * (moe.num_experts // moe.n_group),
               f"moe.top_k = {moe.top_k} must be at most the experts in moe.topk_group = {moe.topk_group} groups "
               f"({moe.topk_group * (moe.num_experts // moe.n_group)})")
        _check(moe.first_k_dense <= m.n_layers,
               f"moe.first_k_dense = {moe.first_k_dense} must be between 0 and model.n_layers = {m.n_layers}")
        _check(moe.shared_expert_hidden > 0 or not moe.shared_expert_gate,
               "moe.shared_expert_gate = true needs a shared expert (moe.shared_expert_hidden > 0)")
        _check(all(0 <= i < m.n_layers for i in moe.dense_layers),
               f"moe.dense_layers = {moe.dense_layers} must hold layer numbers in [0, model.n_layers = {m.n_layers})")
        _check(p.ep == 0 or moe.num_experts % p.ep == 0,
               f"parallel.ep = {p.ep} must divide moe.num_experts = {moe.num_experts}")
    else:
        _check(p.ep in (0, 1), f"parallel.ep = {p.ep} needs moe.num_experts > 0")
    _check(p.dp_shard != 0, f"parallel.dp_shard = {p.dp_shard} must be -1 (the rest) or >= 1")
    _check(cfg.data.text_field != "", "data.text_field must not be empty")
    _check_schedule(cfg)
    _check_mixture(cfg.data)
    _check(cfg.data.document_mask or not cfg.data.restart_positions,
           "data.restart_positions = true needs data.document_mask = true")
    _check(not cfg.metrics.tensorboard or importlib.util.find_spec("tensorboard") is not None,
           "metrics.tensorboard = true needs the tensorboard package (pip install tensorboard)")


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    if isinstance(value, dict):  # a mixture source: an inline table
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML text (loadable by load_config)."""
    lines = []
    for section in dataclasses.fields(cfg):
        lines.append(f"[{section.name}]")
        for name, value in dataclasses.asdict(getattr(cfg, section.name)).items():
            lines.append(f"{name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)
