"""Where attention's masks are composed (causality, documents, a sliding window, the KV cache's offset, sinks) and
the kernel that takes them is chosen and run.

Kernels: "sdpa", scaled_dot_product_attention with is_causal or no mask (on CUDA only where its flash,
memory-efficient or cuDNN kernel takes the tensors); "sdpa-mask", SDPA with a dense mask (on CPU, and on CUDA for a
single query, whose mask is one row per head); "flex", flex_attention with a BlockMask (on CUDA for everything
else), which skips the masked-out blocks and never materialises [B, H, S, S]. On CUDA SDPA never gets enable_gqa
together with a mask: that pair only runs in its math kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, create_block_mask, create_mask, flex_attention


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    """Uncompiled, flex_attention runs an unfused reference (on CPU without backward): CUDA gets the compiled
    kernel. Compiled on first use: importing the compiler costs seconds that CPU runs never need."""
    return torch.compile(flex_attention, dynamic=False)


class AttentionMask:
    """What one forward's attention keeps to: queries at positions start_pos ... start_pos + q_len - 1 see the keys
    at positions up to their own, only within their own document (`segments` [B, q_len], without a cache), and in a
    layer with a window only the last `window` of them. Each window's mask is built once and shared by the layers."""

    def __init__(self, q_len: int, start_pos: int = 0, segments: Tensor | None = None,
                 device: torch.device | str = "cpu"):
        if segments is not None and start_pos:
            raise ValueError("document masks cover a whole sequence: segments cannot continue a KV cache")
        self.q_len, self.start_pos, self.segments = q_len, start_pos, segments
        self.device = torch.device(device)
        self._built: dict[tuple[int, str], Tensor | BlockMask] = {}

    @property
    def kv_len(self) -> int:
        return self.start_pos + self.q_len

    def mask_mod(self, window: int) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
        """flex_attention's mask_mod: True where query q_idx may attend key kv_idx (transformers' sliding window:
        i - window < j <= i)."""
        start_pos, segments = self.start_pos, self.segments

        def visible(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            q_pos = q_idx + start_pos
            keep = kv_idx <= q_pos
            if window:
                keep = keep & (q_pos - kv_idx < window)
            if segments is not None:
                keep = keep & (segments[b, q_idx] == segments[b, kv_idx])
            return keep

        return visible

    def prepare(self, windows: set[int], sinks: bool) -> None:
        """Build every mask a forward's layers will ask for, before them (so that compiled blocks only look up)."""
        for window in windows:
            kernel = attention_kernel(self, window, sinks)
            if kernel != "sdpa":
                self.get(window, kernel)

    def get(self, window: int, kernel: str) -> Tensor | BlockMask:
        """The dense mask [B or 1, 1, q_len, kv_len] (True: may attend) for "sdpa-mask", the BlockMask for "flex"."""
        key = (window, kernel)
        if key not in self._built:
            batch = None if self.segments is None else self.segments.shape[0]
            make = create_block_mask if kernel == "flex" else create_mask
            self._built[key] = make(self.mask_mod(window), batch, None, self.q_len, self.kv_len, device=self.device)
        return self._built[key]


def attention_kernel(mask: AttentionMask, window: int, sinks: bool, qkv: tuple[Tensor, Tensor, Tensor] | None = None
                     ) -> str:
    """The kernel attend() runs for this mask, window and sinks: "sdpa", "sdpa-mask" or "flex" (module docstring).
    Given the tensors, "sdpa" on CUDA only where one of SDPA's fused kernels takes them (flex_attention otherwise)."""
    masked = mask.segments is not None or window > 0 or sinks or (mask.start_pos > 0 and mask.q_len > 1)
    if not masked:  # causal from position 0, or one query that sees the whole cache
        fused = mask.device.type != "cuda" or mask.q_len == 1 or qkv is None or _sdpa_fused(mask, *qkv)
        return "sdpa" if fused else "flex"
    return "flex" if mask.device.type == "cuda" and mask.q_len > 1 else "sdpa-mask"


def _sdpa_fused(mask: AttentionMask, q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether flash, memory-efficient or cuDNN attention takes these tensors causally (else SDPA runs its math
    kernel: fp32 with GQA, head sizes none of them supports)."""
    params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, mask.start_pos == 0, q.shape[1] != k.shape[1])
    return any(check(params) for check in (torch.backends.cuda.can_use_flash_attention,
                                           torch.backends.cuda.can_use_efficient_attention,
                                           torch.backends.cuda.can_use_cudnn_attention))


def flex_attend(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, scale: float | None = None,
                sinks: Tensor | None = None) -> Tensor:
    """flex_attention, compiled on CUDA; each query's softmax also holding exp(sinks[h]) when given."""
    flex = _compiled_flex() if q.device.type == "cuda" else flex_attention
    gqa = q.shape[1] != k.shape[1]
    if sinks is None:
        return flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    out, aux = flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_aux=AuxRequest(lse=True))
    # With the sink in the softmax every weight shrinks by exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink).
    kept = torch.sigmoid(aux.lse - sinks.float().view(1, -1, 1))
    return out * kept.unsqueeze(-1).to(out.dtype)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, window: int = 0, sinks: Tensor | None = None,
           scale: float | None = None) -> Tensor:
    """q [B, H, q_len, dk], k [B, Hkv, kv_len, dk], v [B, Hkv, kv_len, dv] -> [B, H, q_len, dv]; `sinks` [H], a
    logit per head that joins every softmax and takes no value (gpt-oss); `scale` None = dk ** -0.5."""
    kernel = attention_kernel(mask, window, sinks is not None, (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=mask.start_pos == 0, scale=scale, enable_gqa=gqa)
    if kernel == "flex":
        return flex_attend(q, k, v, mask.get(window, kernel), scale, sinks)
    allowed = mask.get(window, kernel)
    if gqa and q.device.type == "cuda":  # a single query here: repeating its keys and values costs little
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        gqa = False
    if sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)
    # The sink as one more key, of zeros, whose additive mask entry is the sink's logit: its score is exactly the
    # sink, it joins the softmax, its value of zeros adds nothing, and the gradient reaches `sinks` through the mask.
    batch, heads, q_len, _ = q.shape
    bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
    sink_column = sinks.to(q.dtype).view(1, heads, 1, 1).expand(batch, heads, q_len, 1)
    bias = torch.cat([bias.expand(batch, heads, q_len, -1), sink_column], dim=-1)
    k, v = F.pad(k, (0, 0, 0, 1)), F.pad(v, (0, 0, 0, 1))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=gqa)
