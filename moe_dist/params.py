"""python -m moe_dist.params --config 3b [--world 8 --ep 8 --device-memory 80GiB --simulate]: parameters, FLOPs,
memory; --config also takes a Hugging Face model dir (config.json); --simulate builds a few of the world's ranks
on a fake process group and checks their shards."""

from __future__ import annotations

import sys

from moe_dist.config import Config, ConfigError, ModelConfig, load_config, parse_args
from moe_dist.hf.config import config_from_hf, is_hf_dir
from moe_dist.memory import HEADROOM, MemoryPlan, activation_dtype_bytes, gib, meta_model, parse_bytes, plan_memory
from moe_dist.model.transformer import is_moe_layer
from moe_dist.simulate import planned_rank, simulate_rank, simulated_ranks

# optim.name: what the optimizer keeps per parameter, as the memory plan's row says it.
OPTIMIZER_STATES = {"adamw": "AdamW states", "muon": "Muon momenta + AdamW states"}


def attention_params(m: ModelConfig) -> tuple[int, int]:
    """(projections, biases and sinks; norms) of one attention layer."""
    out_bias = m.dim if m.out_bias else 0
    if m.attention == "mla":  # no q, k, v biases, q/k norms or sinks
        q_out = m.n_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim)
        # wq, or wq_a and wq_b through the q_lora_rank bottleneck; wkv_a to the latent and the shared rotary key,
        # wkv_b from the latent to every head's k_nope and v; wo from the heads' values.
        q = m.q_lora_rank * (m.dim + q_out) if m.q_lora_rank else m.dim * q_out
        kv = (m.dim * (m.kv_lora_rank + m.qk_rope_head_dim)
              + m.kv_lora_rank * m.n_heads * (m.qk_nope_head_dim + m.v_head_dim))
        wo = m.n_heads * m.v_head_dim * m.dim
        return q + kv + wo + out_bias, m.q_lora_rank + m.kv_lora_rank  # q_a_norm (with wq_a), kv_a_norm
    q_dim, kv_dim = m.n_heads * m.head_size, m.n_kv_heads * m.head_size
    projections = m.dim * (2 * q_dim + 2 * kv_dim) + (q_dim + 2 * kv_dim if m.qkv_bias else 0)
    qk_norms = {"none": 0, "head": 2 * m.head_size, "full": q_dim + kv_dim}[m.qk_norm]
    return projections + out_bias + (m.n_heads if m.attention_sinks else 0), qk_norms


def count_params(cfg: Config) -> dict[str, tuple[int, int]]:
    """{component: (total, active per token)}, counted from the config alone."""
    m, moe = cfg.model, cfg.moe
    attention, attention_norms = attention_params(m)
    n_moe = sum(is_moe_layer(i, moe) for i in range(m.n_layers))
    n_dense = m.n_layers - n_moe
    # Each expert: w1, w3 [D, H] and w2 [H, D], with expert_biases their [H], [H] and [D] biases.
    expert = 3 * m.dim * moe.expert_hidden + (2 * moe.expert_hidden + m.dim if moe.expert_biases else 0)
    router = m.dim * moe.num_experts + (moe.num_experts if moe.router_bias else 0)
    rows = {
        "embedding": (m.vocab_size * m.dim,) * 2,
        "attention": (m.n_layers * attention,) * 2,
        "dense ffn": (n_dense * 3 * m.dim * m.ffn_hidden,) * 2,
        "experts": (n_moe * moe.num_experts * expert, n_moe * moe.top_k * expert),
        "shared expert": (n_moe * (3 * moe.shared_expert_hidden + moe.shared_expert_gate) * m.dim,) * 2,
        "router": (n_moe * router,) * 2,
        "norms": ((2 * m.n_layers + 1) * m.dim + m.n_layers * attention_norms,) * 2,
        "output": (0 if m.tie_embeddings else m.vocab_size * m.dim,) * 2,  # tied: the embedding matrix
    }
    rows["total"] = (sum(t for t, _ in rows.values()), sum(a for _, a in rows.values()))
    return rows


def attention_flops_per_token(cfg: Config) -> int:
    """Forward and backward (3 x 2 FLOPs a multiply-add) of q.k and p.v per head over the keys a query attends:
    the whole sequence, as if not causal (the usual convention), or at most sliding_window keys in a sliding layer."""
    m, seq_len = cfg.model, cfg.data.seq_len
    qk, v = (m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim) if m.attention == "mla" else (m.head_size,) * 2
    keys = sum(min(seq_len, m.sliding_window) if m.sliding_window and i not in m.full_attention_layers else seq_len
               for i in range(m.n_layers))
    return 6 * m.n_heads * (qk + v) * keys


def training_flops_per_token(cfg: Config) -> int:
    """6 x active parameters (all but the embedding lookup and the norms; a tied head still multiplies) + the
    attention's q.k and p.v."""
    rows = count_params(cfg)
    m = cfg.model
    active_matmul = (rows["total"][1] - rows["embedding"][1] - rows["norms"][1]
                     + (m.vocab_size * m.dim if m.tie_embeddings else 0))
    return 6 * active_matmul + attention_flops_per_token(cfg)


def meta_model_numel(cfg: Config) -> int:
    """sum(p.numel()) of the real model, built on the meta device (no memory)."""
    return sum(p.numel() for p in meta_model(cfg).parameters())


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def print_memory_plan(cfg: Config, plan: MemoryPlan, device_memory: int | None) -> None:
    d = cfg.data
    checkpointed = cfg.parallel.activation_checkpoint
    print(f"\nmemory per device: {plan.world} ranks = dp_shard {plan.dp_shard} x ep {plan.ep}, "
          f"micro_batch {d.micro_batch} x seq_len {d.seq_len}, activations in "
          f"{'bf16' if activation_dtype_bytes(cfg, 'cuda') == 2 else 'fp32'}")
    rows = [("parameters (fp32 shards)", plan.params), ("gradients (fp32 shards)", plan.grads),
            (f"{OPTIMIZER_STATES[cfg.optim.name]} (fp32 shards)", plan.optimizer),
            ("FSDP2 gather/reduce buffers", plan.buffers),
            ("activations", plan.activations),
            ("activations, checkpointed", plan.activations_checkpointed)]
    for label, n in rows:
        print(f"  {label:<40} {gib(n):>11}")
    for with_ac in (False, True):
        configured = " (configured)" if with_ac == checkpointed else ""
        label = f"total, {'with' if with_ac else 'no'} activation checkpointing"
        line = f"  {label:<40} {gib(plan.total(with_ac)):>11}{configured}"
        if device_memory is not None:
            budget = device_memory * (1 - HEADROOM)
            line += f" | {'fits' if plan.total(with_ac) <= budget else 'does NOT fit'} in {gib(device_memory)}"
        print(line)
    if device_memory is not None:
        print(f"  (fits = at most {1 - HEADROOM:.0%} of the device: the rest is left for the CUDA context, "
              f"NCCL and fragmentation)")


def main(argv: list[str] | None = None) -> int:
    try:
        name, overrides, options = parse_args(sys.argv[1:] if argv is None else argv, "params",
                                              {"world": True, "ep": True, "device-memory": True,
                                               "simulate": False})
        if "ep" in options:
            overrides["parallel.ep"] = options["ep"]
        cfg = config_from_hf(name, overrides) if is_hf_dir(name) else load_config(name or "tiny", overrides)
        # Without --world: the smallest world the config's mesh fits.
        smallest = max(cfg.parallel.ep, 1) * max(cfg.parallel.dp_shard, 1)
        world = _positive_int("--world", options.get("world", str(smallest)))
        device_memory = None
        if "device-memory" in options:
            try:
                device_memory = parse_bytes(options["device-memory"])
            except ValueError:
                raise ConfigError(f"params: --device-memory {options['device-memory']!r} is not a size "
                                  f"(e.g. 80GiB, 40GB)") from None
        plan = plan_memory(cfg, world)
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
    print_memory_plan(cfg, plan, device_memory)
    return print_simulation(cfg, world) if options.get("simulate") else 0


def print_simulation(cfg: Config, world: int) -> int:
    """Simulated ranks against the plan, one row each; 1 when any differs (a bug in moe_dist)."""
    print("\nsimulated ranks (fake process group, meta tensors), MiB simulated / planned")
    print(f"  {'rank':>6} {'parameters':>19} {'gradients':>19} {'optimizer states':>19}  shard shapes")
    failed, muon = False, ""
    for rank in simulated_ranks(world):
        got, want = simulate_rank(cfg, world, rank), planned_rank(cfg, world, rank)
        muon = got.muon
        pairs = [(got.params, want.params), (got.grads, want.grads), (got.optimizer, want.optimizer)]
        differ = sorted(n for n in want.shapes.keys() | got.shapes.keys() if got.shapes.get(n) != want.shapes.get(n))
        same = not differ and all(a == b for a, b in pairs)
        cells = "".join(f" {f'{a / 2**20:.1f} / {b / 2**20:.1f}':>19}" for a, b in pairs)
        print(f"  {rank:>6}{cells}  {'as planned' if same else 'DIFFER: ' + ', '.join(differ[:3])}")
        failed |= not same
    if muon:
        print(f"  {muon}")
    if failed:
        print("params: the simulated shards differ from the plan", file=sys.stderr)
    return int(failed)


def _positive_int(option: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"params: {option} {text!r} must be a positive integer")
    return value


if __name__ == "__main__":
    sys.exit(main())
