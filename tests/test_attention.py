"""Attention of the four new families against transformers' own modules (weights copied, outputs and gradients):
rotary tables and partial / interleaved rotary, sinks, sliding windows, output biases, MLA; the masks' kernels; the
KV cache; tied embeddings."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import transformers
from hf_models import tiny_model
from torch import Tensor, nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeRotaryEmbedding

from moe_dist.config import ModelConfig, MoEConfig
from moe_dist.generate import generate
from moe_dist.model import Transformer
from moe_dist.model.attention import Attention
from moe_dist.model.masks import AttentionMask, attend, attention_kernel, flex_attend
from moe_dist.model.mla import MLA
from moe_dist.model.rotary import apply_rotary, rotary_tables
from moe_dist.model.transformer import KVCache

SEQ = 16
TINY = dict(vocab_size=96, dim=32, n_heads=4, n_kv_heads=2, max_seq_len=64)


def close(got: Tensor, want: Tensor, what: str) -> None:
    """Relative error at most 1e-5 of the reference's largest entry."""
    scale = want.abs().max().item() or 1.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


# Rotary tables -------------------------------------------------------------------------------------------------

ROPES = {  # name: (transformers' rope_parameters, our ModelConfig fields)
    "default": ({"rope_type": "default"}, {}),
    "linear": ({"rope_type": "linear", "factor": 2.5}, {"rope_scaling": "linear", "rope_factor": 2.5}),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16},
               {"rope_scaling": "llama3", "rope_factor": 8.0, "rope_original_max_seq_len": 16}),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
             {"rope_scaling": "yarn", "rope_factor": 4.0, "rope_original_max_seq_len": 16}),
    "yarn_no_truncate": ({"rope_type": "yarn", "factor": 32.0, "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False,
                          "original_max_position_embeddings": 32},
                         {"rope_scaling": "yarn", "rope_factor": 32.0, "rope_beta_fast": 16.0, "rope_beta_slow": 2.0,
                          "rope_truncate": False, "rope_original_max_seq_len": 32}),
    "yarn_deepseek": ({"rope_type": "yarn", "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 1.0,
                       "original_max_position_embeddings": 16},
                      {"rope_scaling": "yarn", "rope_factor": 40.0, "rope_mscale": 0.707, "rope_mscale_all_dim": 1.0,
                       "rope_original_max_seq_len": 16}),
    "yarn_attention_factor": ({"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.3,
                               "original_max_position_embeddings": 16},
                              {"rope_scaling": "yarn", "rope_factor": 4.0, "rope_attention_factor": 1.3,
                               "rope_original_max_seq_len": 16}),
}


@pytest.mark.parametrize("partial", [1.0, 0.5])
@pytest.mark.parametrize("rope", list(ROPES))
def test_rotary_tables_match_transformers(rope, partial):
    hf_rope, ours = ROPES[rope]
    head_dim, theta = 16, 5e5
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=head_dim,
                                      max_position_embeddings=64, rope_parameters={
                                          **hf_rope, "rope_theta": theta, "partial_rotary_factor": partial})
    if rope == "default":  # GLM-4.5's default honours partial_rotary_factor (Llama's does not)
        inv_freq, factor = Glm4MoeRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        inv_freq, factor = ROPE_INIT_FUNCTIONS[hf_rope["rope_type"]](config, "cpu")
    angles = torch.arange(64, dtype=torch.float32)[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    cfg = ModelConfig(**TINY, head_dim=head_dim, rope_theta=theta, rotary_dim=int(head_dim * partial), **ours)
    cos, sin = rotary_tables(cfg)
    assert cos.shape == (64, int(head_dim * partial))
    close(cos, angles.cos() * factor, "cos")
    close(sin, angles.sin() * factor, "sin")


def test_partial_and_interleaved_rotary_match_transformers():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave
    from transformers.models.glm4_moe.modeling_glm4_moe import apply_rotary_pos_emb

    cos, sin = rotary_tables(ModelConfig(**TINY, head_dim=16, rotary_dim=8))
    cos, sin = cos[:SEQ], sin[:SEQ]
    q, k = torch.randn(2, 4, SEQ, 16), torch.randn(2, 2, SEQ, 16)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    close(apply_rotary(q, cos, sin), want_q, "partial q")
    close(apply_rotary(k, cos, sin), want_k, "partial k")
    want_q, want_k = apply_rotary_pos_emb_interleave(q[..., :8], k[..., :8], cos[None], sin[None])
    close(apply_rotary(q[..., :8], cos, sin, interleave=True), want_q, "interleaved q")
    # Positions of each sequence's own: the per-row tables give what the shared one does at those positions.
    positions = torch.stack([torch.arange(SEQ), torch.arange(SEQ).roll(3)])
    per_row = apply_rotary(q, cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))
    close(per_row[1], apply_rotary(q[1:], cos[positions[1]], sin[positions[1]])[0], "positions")


# Attention against transformers' modules ------------------------------------------------------------------------

NAMES = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "q_a_proj": "wq_a",
         "q_a_layernorm": "q_a_norm", "q_b_proj": "wq_b", "kv_a_proj_with_mqa": "wkv_a", "kv_a_layernorm": "kv_a_norm",
         "kv_b_proj": "wkv_b"}


def our_name(hf_name: str) -> str:
    module, _, rest = hf_name.partition(".")
    return f"{NAMES.get(module, module)}.{rest}" if rest else module


def hf_attention(family: str, **overrides) -> tuple[nn.Module, dict]:
    """Layer 0's attention of a tiny eager `family` model, and the position embeddings and mask its model gave it."""
    model = tiny_model(family, num_hidden_layers=1, attn_implementation="eager", **overrides)
    attention, captured = model.model.layers[0].self_attn, {}
    handle = attention.register_forward_pre_hook(lambda _m, _a, kwargs: captured.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        model(torch.randint(0, 96, (2, SEQ)))
    handle.remove()
    return attention, {"position_embeddings": captured["position_embeddings"],
                       "attention_mask": captured["attention_mask"]}


def compare(hf: nn.Module, hf_kwargs: dict, ours: nn.Module, cfg: ModelConfig, window: int = 0) -> None:
    """Weights copied from `hf` into `ours`; the outputs and the gradients of the input and every weight agree."""
    with torch.no_grad():
        theirs = dict(hf.named_parameters())
        for name, param in ours.named_parameters():
            param.copy_(theirs[next(n for n in theirs if our_name(n) == name)])
    assert len(theirs) == len(list(ours.parameters()))
    x = torch.randn(2, SEQ, cfg.dim, requires_grad=True)
    cos, sin = (t[:SEQ] for t in rotary_tables(cfg))
    got = ours(x, cos, sin, AttentionMask(SEQ), window)
    want = hf(hidden_states=x, **hf_kwargs)[0]
    close(got, want, "output")
    grad = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, [x, *ours.parameters()], grad)
    want_grads = dict(zip(["x", *theirs], torch.autograd.grad(want, [x, *theirs.values()], grad)))
    ours_names = ["x", *(n for n, _ in ours.named_parameters())]
    for name, got_grad in zip(ours_names, got_grads):
        hf_name = name if name == "x" else next(n for n in theirs if our_name(n) == name)
        close(got_grad, want_grads[hf_name], f"grad of {name}")


GPT_OSS = ModelConfig(**TINY, head_dim=8, qkv_bias=True, out_bias=True, attention_sinks=True, sliding_window=4,
                      rope_theta=1.5e5, rope_scaling="yarn", rope_factor=4.0, rope_truncate=False,
                      rope_original_max_seq_len=16)


@pytest.mark.parametrize("layer", ["sliding_attention", "full_attention"])
def test_gpt_oss_attention_sinks_window_out_bias(layer):
    hf, kwargs = hf_attention("gpt_oss", layer_types=[layer], attention_bias=True)
    with torch.no_grad():
        hf.sinks.mul_(10)  # sinks large enough to take a real share of the softmax
    compare(hf, kwargs, Attention(GPT_OSS), GPT_OSS, window=4 if layer == "sliding_attention" else 0)


def test_glm4_moe_partial_rotary_qk_norm_biases():
    cfg = ModelConfig(**TINY, head_dim=16, qkv_bias=True, qk_norm="head", rope_theta=5e5, rotary_dim=8)
    hf, kwargs = hf_attention("glm4_moe")
    compare(hf, kwargs, Attention(cfg), cfg)


def test_minimax_m2_full_qk_norm_partial_rotary():
    cfg = ModelConfig(**TINY, head_dim=16, qk_norm="full", rope_theta=5e5, rotary_dim=4, norm_eps=1e-6)
    hf, kwargs = hf_attention("minimax_m2")
    compare(hf, kwargs, Attention(cfg), cfg)


DEEPSEEK = ModelConfig(**{**TINY, "n_kv_heads": 4}, attention="mla", q_lora_rank=16, kv_lora_rank=12,
                       qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, rope_interleave=True, rope_theta=1e4,
                       rope_scaling="yarn", rope_factor=4.0, rope_original_max_seq_len=16, rope_mscale=1.0,
                       rope_mscale_all_dim=1.0)


@pytest.mark.parametrize("q_lora_rank", [16, 0])
@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("mscale_all_dim", [1.0, 0.5])
def test_deepseek_v3_mla(q_lora_rank, interleave, mscale_all_dim):
    cfg = dataclasses.replace(DEEPSEEK, q_lora_rank=q_lora_rank, rope_interleave=interleave,
                              rope_mscale_all_dim=mscale_all_dim)
    rope = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 16,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": mscale_all_dim}
    hf, kwargs = hf_attention("deepseek_v3", num_key_value_heads=4, q_lora_rank=q_lora_rank or None,
                              rope_interleave=interleave, rope_parameters=rope)
    assert hf.scaling == MLA(cfg).scale
    compare(hf, kwargs, MLA(cfg), cfg)


# The masks' kernels ---------------------------------------------------------------------------------------------

def test_kernel_choice():
    documents = torch.zeros(2, SEQ, dtype=torch.long)
    for device, masked in (("cpu", "sdpa-mask"), ("cuda", "flex")):
        assert attention_kernel(AttentionMask(SEQ, device=device), 0, False) == "sdpa"
        assert attention_kernel(AttentionMask(1, start_pos=5, device=device), 0, False) == "sdpa"
        assert attention_kernel(AttentionMask(SEQ, segments=documents, device=device), 0, False) == masked
        assert attention_kernel(AttentionMask(SEQ, device=device), 4, False) == masked
        assert attention_kernel(AttentionMask(SEQ, device=device), 0, True) == masked
        assert attention_kernel(AttentionMask(SEQ, start_pos=3, device=device), 0, False) == masked
        assert attention_kernel(AttentionMask(1, start_pos=5, device=device), 4, True) == "sdpa-mask"


def eager_reference(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, sinks: Tensor | None) -> Tensor:
    """gpt-oss's eager attention: scores, the sink logit as one more column, softmax, the sink's share dropped."""
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)], dim=-1)
    return scores.softmax(-1)[..., :v.shape[-2]] @ v


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # unfused on purpose: CPU
@pytest.mark.parametrize("case", ["documents", "window", "sinks", "all", "cache offset", "mla head sizes"])
def test_masks_dense_and_flex_match_the_eager_formula(case):
    start_pos = 5 if case == "cache offset" else 0
    segments = torch.tensor([[0] * 6 + [1] * 10, [0] * 11 + [1] * 5]) if case in ("documents", "all") else None
    window = 3 if case in ("window", "all", "mla head sizes") else 0
    sinks = torch.randn(4) if case in ("sinks", "all") else None
    kv_heads, v_dim = (4, 6) if case == "mla head sizes" else (2, 8)
    q = torch.randn(2, 4, SEQ, 8)
    k, v = torch.randn(2, kv_heads, start_pos + SEQ, 8), torch.randn(2, kv_heads, start_pos + SEQ, v_dim)
    mask = AttentionMask(SEQ, start_pos, segments)
    q_pos, kv_pos = torch.arange(start_pos, start_pos + SEQ)[:, None], torch.arange(start_pos + SEQ)
    allowed = (kv_pos <= q_pos) & ((q_pos - kv_pos < window) if window else True)
    if segments is not None:
        allowed = allowed & (segments[:, :, None] == segments[:, None, :])[:, None]
    want = eager_reference(q, k, v, allowed, sinks)
    close(attend(q, k, v, mask, window, sinks), want, "sdpa with a dense mask")
    # flex_attention runs forward on CPU (unfused): the BlockMask and the sinks through the logsumexp.
    block_mask = AttentionMask(SEQ, start_pos, segments).get(window, "flex")
    close(flex_attend(q, k, v, block_mask, sinks=sinks), want, "flex_attention")


def test_sink_gradient_matches_the_eager_formula():
    q, k, v = (torch.randn(2, h, SEQ, 8, requires_grad=True) for h in (4, 2, 2))
    sinks = torch.randn(4, requires_grad=True)
    allowed = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    got = attend(q, k, v, AttentionMask(SEQ), 4, sinks)
    want = eager_reference(q, k, v, allowed & torch.ones(SEQ, SEQ, dtype=torch.bool).triu(-3), sinks)
    grad = torch.randn_like(want)
    for name, a, b in zip(("q", "k", "v", "sinks"), torch.autograd.grad(got, (q, k, v, sinks), grad),
                          torch.autograd.grad(want, (q, k, v, sinks), grad)):
        close(a, b, f"grad of {name}")


# The whole model ------------------------------------------------------------------------------------------------

MOE = MoEConfig(num_experts=4, top_k=2, expert_hidden=16)


@pytest.mark.parametrize("cfg", [
    dataclasses.replace(GPT_OSS, n_layers=2, full_attention_layers=[1], ffn_hidden=32),
    dataclasses.replace(DEEPSEEK, n_layers=2, ffn_hidden=32, sliding_window=5),
], ids=["window+sinks", "mla"])
def test_cached_forward_matches_full_forward(cfg):
    model = Transformer(cfg, MOE).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 20))
    cache = KVCache.empty(cfg, batch_size=2)
    with torch.no_grad():
        full, _ = model(tokens)
        chunks = [model(tokens[:, :9], cache, 0)[0]]  # a prompt longer than the window, then one token at a time
        chunks += [model(tokens[:, i:i + 1], cache, i)[0] for i in range(9, 20)]
    close(torch.cat(chunks, dim=1), full, "cached logits")


def test_tied_embeddings():
    cfg = dataclasses.replace(GPT_OSS, n_layers=1, ffn_hidden=32, tie_embeddings=True)
    model = Transformer(cfg, MOE)
    assert not hasattr(model, "output") and "output.weight" not in dict(model.named_parameters())
    tokens = torch.randint(0, cfg.vocab_size, (2, SEQ))
    logits, _ = model(tokens)
    h = model.tok_embeddings(tokens)
    for layer in model.layers:
        h, _ = layer(h, model.rope_cos[:SEQ], model.rope_sin[:SEQ], AttentionMask(SEQ))
    close(logits, model.norm(h) @ model.tok_embeddings.weight.T, "logits")
    F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    assert model.tok_embeddings.weight.grad is not None


def test_new_parameters_start_at_zero():
    cfg = dataclasses.replace(GPT_OSS, n_layers=1, ffn_hidden=32)
    model = Transformer(cfg, MOE)
    attention = model.layers[0].attention
    assert attention.sinks.eq(0).all() and attention.wo.bias.eq(0).all() and attention.wq.bias.eq(0).all()
    assert model.initial_value("layers.0.ffn.experts.w1_bias", torch.Size([4, 16]), "cpu").eq(0).all()
    mla = Transformer(dataclasses.replace(DEEPSEEK, n_layers=2), MOE).layers[0].attention
    residual = DEEPSEEK.init_std / 2  # 1 / sqrt(2 * n_layers)
    assert abs(mla.wo.weight.std().item() - residual) < 0.3 * residual
    assert mla.q_a_norm.weight.eq(1).all() and mla.kv_a_norm.weight.eq(1).all()


@pytest.mark.parametrize("cfg", [
    dataclasses.replace(GPT_OSS, n_layers=2, full_attention_layers=[1], ffn_hidden=32),
    dataclasses.replace(DEEPSEEK, n_layers=2, ffn_hidden=32),
], ids=["window+sinks", "mla"])
def test_generate_is_the_same_with_and_without_cache(cfg):
    model = Transformer(cfg, MOE).eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, 3), generator=torch.Generator().manual_seed(0))
    assert torch.equal(generate(model, prompt, 12), generate(model, prompt, 12, use_cache=False))
