"""Dataclass configs, TOML loading, dotted command-line overrides and validation."""

from __future__ import annotations

import dataclasses
import importlib.util
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


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_hidden: int = 384  # dense SwiGLU hidden size
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02


@dataclass
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 192
    score_func: str = "softmax"  # softmax | sigmoid
    renormalize: bool = True  # renormalise the k combine weights to sum to 1
    every_n_layers: int = 1  # MoE in every n-th layer after the first `first_k_dense` ...
    first_k_dense: int = 0  # ... dense layers; num_experts = 0 makes every layer dense
    aux_loss_coef: float = 0.01  # Switch/GShard load-balancing loss
    z_loss_coef: float = 0.001
    aux_free_bias: bool = False  # auxiliary-loss-free balancing (per-expert selection bias)
    bias_update_rate: float = 0.001
    capacity_factor: float = 0.0  # 0 = dropless; else tokens per expert per sequence are capped
    shared_expert_hidden: int = 0  # 0 = no shared expert
    grouped_mm_backend: str = "auto"  # auto | grouped_mm | padded | loop


@dataclass
class ParallelConfig:
    ep: int = 1  # expert-parallel degree; 0 = auto: gcd(world size, num_experts)
    dp_shard: int = -1  # -1 = world // ep
    activation_checkpoint: bool = False
    compile: bool = False
    param_dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16
    reduce_dtype: str = "float32"


@dataclass
class DataConfig:
    path: str = ""  # directory written by moe_dist.data.prep; "" = the built-in default corpus
    seq_len: int = 128
    micro_batch: int = 4  # sequences per rank per micro-step
    val_fraction: float = 0.02
    text_field: str = "text"
    seed: int = 1234


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off


@dataclass
class TrainConfig:
    name: str = "tiny"
    steps: int = 100  # the schedule's length
    stop_after: int = 0  # stop (checkpointed) at this step, e.g. to fit a job's time limit; 0 = at train.steps
    grad_accum: int = 1
    seed: int = 0
    eval_interval: int = 50  # 0 = only at the end
    eval_steps: int = 4
    device: str = "auto"  # auto | cpu | cuda
    max_nonfinite_steps: int = 5  # a non-finite loss or gradient skips the step; this many in a row stop the run


@dataclass
class CheckpointConfig:
    interval: int = 0  # 0 = only at the end
    keep_last: int = 2
    resume: str = ""  # "" | auto (newest checkpoint that verifies, falling back to older ones)
    async_save: bool = False


@dataclass
class MetricsConfig:
    log_interval: int = 10
    runs_dir: str = "runs"
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
    "moe.score_func": ("softmax", "sigmoid"),
    "moe.grouped_mm_backend": ("auto", "grouped_mm", "padded", "loop"),
    "parallel.param_dtype": ("auto", "float32", "bfloat16"),
    "parallel.reduce_dtype": ("float32", "bfloat16"),
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
    raise ConfigError(f"config: {key} must be {typ.__name__}, got {value!r}")


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


def load_config(name_or_path: str | None = None, overrides: dict[str, object] | None = None) -> Config:
    """Defaults, then a TOML file, then dotted overrides; validated."""
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


def validate(cfg: Config) -> None:
    """Reject impossible combinations with one line naming the key."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _check(value in allowed, f"{key} = {value!r} is not one of {', '.join(map(repr, allowed))}")
    m, moe, p = cfg.model, cfg.moe, cfg.parallel
    for key in ("model.vocab_size", "model.dim", "model.n_layers", "model.n_heads", "model.n_kv_heads",
                "model.ffn_hidden", "model.max_seq_len", "data.seq_len", "data.micro_batch",
                "train.steps", "train.grad_accum", "train.max_nonfinite_steps", "metrics.log_interval"):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _check(value >= 1, f"{key} = {value} must be >= 1")
    _check(m.dim % m.n_heads == 0, f"model.n_heads = {m.n_heads} must divide model.dim = {m.dim}")
    _check((m.dim // m.n_heads) % 2 == 0, f"model.dim / model.n_heads = {m.dim // m.n_heads} must be even (rotary)")
    _check(m.n_heads % m.n_kv_heads == 0,
           f"model.n_kv_heads = {m.n_kv_heads} must divide model.n_heads = {m.n_heads}")
    _check(cfg.data.seq_len <= m.max_seq_len,
           f"data.seq_len = {cfg.data.seq_len} exceeds model.max_seq_len = {m.max_seq_len}")
    _check(moe.num_experts >= 0, f"moe.num_experts = {moe.num_experts} must be >= 0")
    if moe.num_experts > 0:
        _check(1 <= moe.top_k <= moe.num_experts,
               f"moe.top_k = {moe.top_k} must be between 1 and moe.num_experts = {moe.num_experts}")
        _check(moe.expert_hidden >= 1, f"moe.expert_hidden = {moe.expert_hidden} must be >= 1")
        _check(moe.every_n_layers >= 1, f"moe.every_n_layers = {moe.every_n_layers} must be >= 1")
        _check(0 <= moe.first_k_dense <= m.n_layers,
               f"moe.first_k_dense = {moe.first_k_dense} must be between 0 and model.n_layers = {m.n_layers}")
        _check(p.ep >= 0, f"parallel.ep = {p.ep} must be >= 1, or 0 for auto")
        _check(p.ep == 0 or moe.num_experts % p.ep == 0,
               f"parallel.ep = {p.ep} must divide moe.num_experts = {moe.num_experts}")
    else:
        _check(p.ep in (0, 1), f"parallel.ep = {p.ep} needs moe.num_experts > 0")
    _check(moe.capacity_factor >= 0, f"moe.capacity_factor = {moe.capacity_factor} must be >= 0 (0 = dropless)")
    _check(moe.shared_expert_hidden >= 0, f"moe.shared_expert_hidden = {moe.shared_expert_hidden} must be >= 0")
    _check(p.dp_shard == -1 or p.dp_shard >= 1, f"parallel.dp_shard = {p.dp_shard} must be -1 (the rest) or >= 1")
    _check(0.0 <= cfg.data.val_fraction < 1.0, f"data.val_fraction = {cfg.data.val_fraction} must be in [0, 1)")
    _check(cfg.optim.lr > 0, f"optim.lr = {cfg.optim.lr} must be > 0")
    _check(cfg.checkpoint.keep_last >= 1, f"checkpoint.keep_last = {cfg.checkpoint.keep_last} must be >= 1")
    _check(not cfg.metrics.tensorboard or importlib.util.find_spec("tensorboard") is not None,
           "metrics.tensorboard = true needs the tensorboard package (pip install tensorboard)")


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML text (loadable by load_config)."""
    lines = []
    for section in dataclasses.fields(cfg):
        lines.append(f"[{section.name}]")
        for name, value in dataclasses.asdict(getattr(cfg, section.name)).items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
            else:
                text = repr(value)
            lines.append(f"{name} = {text}")
        lines.append("")
    return "\n".join(lines)
