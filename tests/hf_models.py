"""Tiny random models of the four Hugging Face MoE families, saved as transformers saves them (no download)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
              max_position_embeddings=64, router_aux_loss_coef=0.02,
              rope_parameters={"rope_type": "default", "rope_theta": 5e5})  # not a family's default
FAMILIES = {
    # Mixtral: every layer MoE, renormalised top-k.
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(num_hidden_layers=2, intermediate_size=48, num_local_experts=4)),
    # Qwen2-MoE: q/k/v biases, a gated shared expert, a dense layer by mlp_only_layers, a head_dim of its own,
    # top-k weights not renormalised.
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  dict(num_hidden_layers=3, intermediate_size=40, moe_intermediate_size=24, num_experts=4,
                       shared_expert_intermediate_size=36, mlp_only_layers=[1], norm_topk_prob=False, qkv_bias=True,
                       head_dim=12)),
    # Qwen3-MoE: per-head QK-norm, dense layers by decoder_sparse_step, renormalised top-k.
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(num_hidden_layers=3, intermediate_size=40, moe_intermediate_size=24, num_experts=4,
                       decoder_sparse_step=1, mlp_only_layers=[0], norm_topk_prob=True, head_dim=16)),
    # OLMoE: QK-norm over the whole projections, clip_qkv (it clips: the normed q and k are about 1 in size).
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM,
              dict(num_hidden_layers=2, intermediate_size=24, num_experts=4, norm_topk_prob=False, clip_qkv=1.0,
                   eos_token_id=None, pad_token_id=None)),
}


def tiny_model(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A tiny model of `family` in fp32 with every weight random (norms around 1), so that a weight mapped to
    the wrong place changes the logits and no two experts tie; `overrides` change its config."""
    config_cls, model_cls, values = FAMILIES[family]
    model = model_cls(config_cls(**{**COMMON, **values, **overrides})).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * noise if "norm" in name else 0.15 * noise)
    return model


def save_tiny(family: str, directory: Path, layout: str = "single", seed: int = 0,
              **overrides) -> transformers.PreTrainedModel:
    """Save a tiny model as save_pretrained does (layout "single" or "sharded": per-expert keys), or as its
    in-memory state dict ("fused": transformers 5's gate_up_proj / down_proj); returns the model."""
    model = tiny_model(family, seed, **overrides)
    if layout == "fused":
        model.config.save_pretrained(directory)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, Path(directory) / "model.safetensors")
    else:
        model.save_pretrained(directory, max_shard_size="40KB" if layout == "sharded" else "50GB")
    return model
