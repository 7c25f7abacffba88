"""Tiny random models of the eight Hugging Face MoE families and the four dense ones, saved as transformers saves
them (no download)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import transformers
from quantize import quantize_fp8, quantize_mxfp4
from safetensors.torch import load_file, save_file
from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

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
    # DeepSeek-V3: MLA with a q bottleneck and interleaved rotary under YaRN (its mscale in the softmax scale),
    # sigmoid routing with a correction bias, 2 groups of which 1 is chosen, scaled weights, a shared expert,
    # one leading dense layer.
    "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM,
                    dict(num_hidden_layers=3, intermediate_size=40, moe_intermediate_size=16, n_routed_experts=4,
                         num_key_value_heads=4, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=16,
                         kv_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6, n_group=2, topk_group=1,
                         routed_scaling_factor=2.5, rope_interleave=True,
                         rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                          "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
                                          "mscale": 1.0, "mscale_all_dim": 1.0})),
    # GLM-4.5: half of each head rotated, q/k/v biases, per-head QK-norm, sigmoid + correction bias in groups,
    # scaled weights, a shared expert, one leading dense layer.
    "glm4_moe": (transformers.Glm4MoeConfig, transformers.Glm4MoeForCausalLM,
                 dict(num_hidden_layers=3, intermediate_size=40, moe_intermediate_size=16, n_routed_experts=4,
                      n_shared_experts=1, first_k_dense_replace=1, head_dim=16, attention_bias=True, use_qk_norm=True,
                      n_group=2, topk_group=1, routed_scaling_factor=1.5,
                      rope_parameters={"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 0.5})),
    # gpt-oss: sinks, sliding and full layers alternating (a window of 4 in 16 tokens), biases everywhere, the
    # clamped SwiGLU, YaRN.
    "gpt_oss": (transformers.GptOssConfig, transformers.GptOssForCausalLM,
                dict(num_hidden_layers=2, intermediate_size=32, num_local_experts=4, head_dim=8, sliding_window=4,
                     rope_parameters={"rope_type": "yarn", "rope_theta": 1.5e5, "factor": 4.0, "beta_fast": 32.0,
                                      "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 16})),
    # MiniMax-M2: a quarter of each head rotated, QK-norm over the whole projections, sigmoid + correction bias.
    "minimax_m2": (transformers.MiniMaxM2Config, transformers.MiniMaxM2ForCausalLM,
                   dict(num_hidden_layers=2, intermediate_size=16, num_local_experts=4, head_dim=16, rotary_dim=4,
                        bos_token_id=None, eos_token_id=None)),
}
NEW_FAMILIES = ("deepseek_v3", "glm4_moe", "gpt_oss", "minimax_m2")
DENSE_COMMON = {key: value for key, value in COMMON.items()
                if key not in ("num_experts_per_tok", "router_aux_loss_coef")}
DENSE = {
    # Llama: biases on q, k, v and o.
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(num_hidden_layers=2, intermediate_size=48, attention_bias=True)),
    # Mistral: a window of 4 in every layer.
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(num_hidden_layers=2, intermediate_size=48, sliding_window=4)),
    # Qwen2: q/k/v biases, a window of 4 from layer 1 on (max_window_layers), tied embeddings.
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(num_hidden_layers=2, intermediate_size=48, use_sliding_window=True, sliding_window=4,
                   max_window_layers=1, tie_word_embeddings=True)),
    # Qwen3: per-head QK-norm, a head_dim of its own, biases on q, k, v and o.
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(num_hidden_layers=2, intermediate_size=48, head_dim=16, attention_bias=True)),
}


def tiny_model(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A tiny model of `family` in fp32 with every weight random (norms around 1), so that a weight mapped to
    the wrong place changes the logits and no two experts tie; `overrides` change its config."""
    config_cls, model_cls, values = {**FAMILIES, **DENSE}[family]
    common = DENSE_COMMON if family in DENSE else COMMON
    # A copy: transformers writes into the rope_parameters dict it is given (partial_rotary_factor, for one).
    model = model_cls(config_cls(**copy.deepcopy({**common, **values, **overrides}))).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * noise if "norm" in name else 0.15 * noise)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # a trained model's: enough to change the choice
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
    return model


def save_tiny(family: str, directory: Path, layout: str = "single", seed: int = 0,
              **overrides) -> transformers.PreTrainedModel:
    """Save a tiny model as save_pretrained does (layout "single" or "sharded": per-expert keys), as its
    in-memory state dict ("fused": transformers 5's gate_up_proj / down_proj), or quantized as the family ships
    ("quantized": DeepSeek-V3 FP8, gpt-oss MXFP4, the model then holding the dequantized values); returns the model."""
    model = tiny_model(family, seed, **overrides)
    if layout == "quantized":
        save_quantized(model, family, Path(directory))
    elif layout == "fused":
        model.config.save_pretrained(directory)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, Path(directory) / "model.safetensors")
    else:
        model.save_pretrained(directory, max_shard_size="40KB" if layout == "sharded" else "50GB")
    return model


def save_quantized(hf: transformers.PreTrainedModel, family: str, directory: Path) -> None:
    """`hf` saved as its family ships: DeepSeek-V3's linear weights in FP8 with 128 x 128 (here 8 x 8) block scales,
    gpt-oss's experts in MXFP4; `hf` then holds the dequantized values, as transformers would load them."""
    hf.save_pretrained(directory)
    stored = load_file(directory / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())
    out = {}
    state = hf.state_dict()
    with torch.no_grad():
        for key, value in stored.items():
            if family == "deepseek_v3" and ".layers." in key and not key.endswith(("norm.weight", "gate.weight",
                                                                                       "correction_bias")):
                weight, scale_inv = quantize_fp8(value, (8, 8))
                out[key], out[key + "_scale_inv"] = weight, scale_inv
                if key in state:  # the per-expert ones are fused in memory: _refill_fused_experts
                    state[key].copy_(_dequantized_fp8(weight, scale_inv))
            elif family == "gpt_oss" and key.endswith(("experts.gate_up_proj", "experts.down_proj")):
                blocks, scales = quantize_mxfp4(value)
                out[key + "_blocks"], out[key + "_scales"] = blocks, scales
                state[key].copy_(_dequantized_mxfp4(blocks, scales))
            else:
                out[key] = value
    if family == "deepseek_v3":  # per-expert keys on disk, fused in memory: refill those from the file
        _refill_fused_experts(hf, out)
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [8, 8]}
    else:
        config["quantization_config"] = {"quant_method": "mxfp4"}
    (directory / "config.json").write_text(json.dumps(config))
    save_file(out, directory / "model.safetensors", metadata={"format": "pt"})


def _dequantized_fp8(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    return _dequantize_fp8_weight(weight, scale_inv, [8, 8], torch.float32)


def _dequantized_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)


def _refill_fused_experts(hf: transformers.PreTrainedModel, stored: dict[str, torch.Tensor]) -> None:
    """transformers' fused gate_up_proj / down_proj from the per-expert FP8 keys, dequantized as it would."""
    with torch.no_grad():
        for i, layer in enumerate(hf.model.layers):
            experts = getattr(layer.mlp, "experts", None)
            if experts is None:
                continue
            prefix = f"model.layers.{i}.mlp.experts."
            for j in range(experts.gate_up_proj.shape[0]):
                part = {name: _dequantized_fp8(stored[f"{prefix}{j}.{name}.weight"],
                                               stored[f"{prefix}{j}.{name}.weight_scale_inv"])
                        for name in ("gate_proj", "up_proj", "down_proj")}
                experts.gate_up_proj[j].copy_(torch.cat([part["gate_proj"], part["up_proj"]]))
                experts.down_proj[j].copy_(part["down_proj"])
