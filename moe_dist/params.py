"""python -m moe_dist.params --config 3b: total and active parameters, training FLOPs per token."""

from __future__ import annotations

import sys

import torch

from moe_dist.config import Config, ConfigError, load_config, parse_args
from moe_dist.model.transformer import Transformer, is_moe_layer


def count_params(cfg: Config) -> dict[str, tuple[int, int]]:
    """{component: (total, active per token)}, counted from the config alone."""
    m, moe = cfg.model, cfg.moe
    head_dim = m.dim // m.n_heads
    attention = m.dim * head_dim * (2 * m.n_heads + 2 * m.n_kv_heads)
    n_moe = sum(is_moe_layer(i, moe) for i in range(m.n_layers))
    n_dense = m.n_layers - n_moe
    experts = n_moe * moe.num_experts * 3 * m.dim * moe.expert_hidden
    active_experts = n_moe * moe.top_k * 3 * m.dim * moe.expert_hidden
    rows = {
        "embedding": (m.vocab_size * m.dim,) * 2,
        "attention": (m.n_layers * attention,) * 2,
        "dense ffn": (n_dense * 3 * m.dim * m.ffn_hidden,) * 2,
        "experts": (experts, active_experts),
        "shared expert": (n_moe * 3 * m.dim * moe.shared_expert_hidden,) * 2,
        "router": (n_moe * m.dim * moe.num_experts,) * 2,
        "norms": ((2 * m.n_layers + 1) * m.dim,) * 2,
        "output": (m.vocab_size * m.dim,) * 2,
    }
    rows["total"] = (sum(t for t, _ in rows.values()), sum(a for _, a in rows.values()))
    return rows


def training_flops_per_token(cfg: Config) -> int:
    """6 x active matmul parameters (all but the embedding lookup) + 12 x layers x dim x seq_len (attention)."""
    rows = count_params(cfg)
    active_matmul = rows["total"][1] - rows["embedding"][1] - rows["norms"][1]
    return 6 * active_matmul + 12 * cfg.model.n_layers * cfg.model.dim * cfg.data.seq_len


def meta_model_numel(cfg: Config) -> int:
    """sum(p.numel()) of the real model, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.moe)
    return sum(p.numel() for p in model.parameters())


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def main(argv: list[str] | None = None) -> int:
    try:
        name, overrides, rest = parse_args(sys.argv[1:] if argv is None else argv)
        if rest:
            raise ConfigError(f"params: unknown option {rest[0]!r} (expected --config NAME and --section.field value)")
        cfg = load_config(name or "tiny", overrides)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    rows = count_params(cfg)
    print(f"{'component':<14} {'total':>16} {'active/token':>16}")
    for component, (total, active) in rows.items():
        print(f"{component:<14} {total:>16,} {active:>16,}")
    total = rows["total"][0]
    print(f"\ntotal {_human(total)} parameters, {_human(rows['total'][1])} active per token")
    print(f"training FLOPs per token (seq_len {cfg.data.seq_len}): {training_flops_per_token(cfg):,}")
    numel = meta_model_numel(cfg)
    if numel != total:
        print(f"params: meta-device model has {numel:,} parameters, counter says {total:,}", file=sys.stderr)
        return 1
    print(f"meta-device model: sum(p.numel()) = {numel:,} (matches)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
