"""The families of 2025 (DeepSeek-V3 / Kimi K2, GLM-4.5, gpt-oss, MiniMax-M2) beside those of 2024: every gradient of
the cross-entropy equals transformers', the quantized checkpoints they ship import to transformers' own values, and
each mapped feature matters (turned off, the logits move)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from equivalence import relative_error
from hf_models import FAMILIES, save_tiny

from moe_dist.checkpoint import CheckpointError
from moe_dist.hf.config import config_from_hf, family_of
from moe_dist.hf.weights import HFWeights, import_model, open_init_weights, weight_sources
from moe_dist.memory import meta_model
from moe_dist.parallel.materialize import filled_tensors
from moe_dist.train import loss_fn

SEQ_LEN = 16


def tokens(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (batch, SEQ_LEN + 1), generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(inputs)
    return out[0] if isinstance(out, tuple) else out.logits


def hf_gradients_as_ours(hf: torch.nn.Module, cfg, directory: Path) -> dict[str, torch.Tensor]:
    """transformers' gradients under our names and layout: written as a checkpoint in its in-memory (fused) naming
    and read back through the import's own name map, as its weights are."""
    grads = {name: (p.grad if p.grad is not None else torch.zeros_like(p)) for name, p in hf.named_parameters()}
    grads.update({name: torch.zeros_like(b) for name, b in hf.named_buffers() if name.endswith("correction_bias")})
    directory.mkdir()
    hf.config.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in grads.items()}, directory / "model.safetensors")
    shapes = {name: t.shape for name, t in filled_tensors(meta_model(cfg))}
    weights = HFWeights(directory, weight_sources(cfg, family_of(cfg)), shapes)
    return {name: weights.read(name, shape, tuple(slice(0, n) for n in shape)) for name, shape in shapes.items()}


# The 2024 families with what they used to refuse: RoPE scaling, sliding windows, tied embeddings, output biases.
EXTRAS = [
    ("mixtral", dict(sliding_window=5, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})),
    ("qwen2_moe", dict(use_sliding_window=True, sliding_window=4, max_window_layers=2,
                       rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5,
                                        "original_max_position_embeddings": 8, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0})),
    ("qwen3_moe", dict(use_sliding_window=True, sliding_window=6, attention_bias=True,
                       rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                        "original_max_position_embeddings": 8})),
    ("olmoe", dict(tie_word_embeddings=True, attention_bias=True,
                   rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4, "attention_factor": 1.2,
                                    "original_max_position_embeddings": 8, "beta_fast": 16.0, "beta_slow": 2.0})),
]


@pytest.mark.parametrize("family, overrides", [(family, {}) for family in FAMILIES] + EXTRAS)
def test_every_cross_entropy_gradient_equals_transformers(tmp_path, family, overrides):
    hf = save_tiny(family, tmp_path / "src", "single", **overrides)
    model, cfg = import_model(tmp_path / "src", {"data.seq_len": SEQ_LEN})
    window = tokens()
    inputs, targets = window[:, :-1], window[:, 1:]
    out, _ = model(inputs)
    ours_loss = loss_fn(out, targets)
    ours_loss.backward()
    hf_logits = hf(inputs).logits
    hf_loss = F.cross_entropy(hf_logits.flatten(0, 1), targets.flatten())
    hf_loss.backward()
    assert relative_error(out.detach(), hf_logits.detach()) <= 1e-5
    assert ours_loss.item() == pytest.approx(hf_loss.item(), rel=1e-6)
    want = hf_gradients_as_ours(hf, cfg, tmp_path / "grads")
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, want[name], rtol=1e-5, atol=1e-5 * want[name].abs().max().item(),
                                   msg=f"{family} {name}")


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_a_quantized_checkpoint_imports_to_transformers_dequantized_values(tmp_path, family):
    hf = save_tiny(family, tmp_path, "quantized")
    model, _ = import_model(tmp_path, {"data.seq_len": SEQ_LEN})
    inputs = tokens()[:, :-1]
    assert relative_error(logits(model, inputs), logits(hf, inputs)) <= 1e-5


def _zero_correction_bias(model: torch.nn.Module) -> None:
    for layer in model.layers:
        router = getattr(layer.ffn, "router", None)
        if router is not None:
            router.expert_bias.zero_()


def _sinks_off(model: torch.nn.Module) -> None:
    for layer in model.layers:
        layer.attention.sinks.fill_(-1e4)  # exp(-1e4) = 0: the sink takes no share of any softmax


# One flip per mapped feature: each must move the logits, or the parity above would not show that it is mapped.
FLIPS = [
    ("deepseek_v3", {"model.rope_scaling": "none"}, None),  # YaRN off
    ("deepseek_v3", {"model.rope_interleave": False}, None),
    ("deepseek_v3", {}, _zero_correction_bias),
    ("deepseek_v3", {"moe.routed_scaling_factor": 1.0}, None),
    ("glm4_moe", {"model.rotary_dim": 0}, None),  # partial rotary made full
    ("glm4_moe", {}, _zero_correction_bias),
    ("gpt_oss", {"model.sliding_window": 64}, None),  # the window widened
    ("gpt_oss", {}, _sinks_off),
    ("gpt_oss", {"model.rope_scaling": "none"}, None),
    ("gpt_oss", {"moe.swiglu_limit": 0.1}, None),
    ("minimax_m2", {"model.rotary_dim": 0}, None),
    ("minimax_m2", {}, _zero_correction_bias),
]


@pytest.mark.parametrize("family, override, change", FLIPS)
def test_each_mapped_feature_moves_the_logits(tmp_path, family, override, change):
    hf = save_tiny(family, tmp_path)
    model, _ = import_model(tmp_path, {"data.seq_len": SEQ_LEN, **override})
    if change is not None:
        with torch.no_grad():
            change(model)
    inputs = tokens()[:, :-1]
    assert relative_error(logits(model, inputs), logits(hf, inputs)) > 1e-3


def test_a_quantized_tensor_without_its_scales_is_one_line(tmp_path):
    save_tiny("deepseek_v3", tmp_path, "quantized")
    stored = load_file(tmp_path / "model.safetensors")
    key = "model.layers.0.self_attn.kv_b_proj.weight_scale_inv"
    del stored[key]
    save_file(stored, tmp_path / "model.safetensors")
    cfg = config_from_hf(tmp_path, {"train.init_from": str(tmp_path)})
    with pytest.raises(CheckpointError, match="kv_b_proj.weight has dtype F8_E4M3"):
        open_init_weights(cfg)

