"""python -m moe_dist.generate: sample text from a run, a checkpoint or an export, with a KV cache."""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from torch import Tensor

from moe_dist.cli import OneLineParser, error_line
from moe_dist.config import ConfigError
from moe_dist.data import DataError
from moe_dist.data.tokenizer import EOS_TOKEN, eos_id, load_tokenizer
from moe_dist.export import ExportError, load_for_inference
from moe_dist.model.transformer import KVCache, Transformer


# Below this, logits / temperature can overflow float32 (a denormal temperature makes every logit infinite),
# and sampling is greedy in all but name anyway.
MIN_TEMPERATURE = 1e-6


def sample_next(logits: Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """logits [B, V] -> next token ids [B, 1]; temperature 0 is greedy, top_k 0 and top_p 1 are off."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the more likely ones already cover top_p; the most likely one always stays.
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


@torch.inference_mode()
def generate(model: Transformer, prompt: Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, generator: torch.Generator | None = None, use_cache: bool = True,
             stop_id: int | None = None) -> Tensor:
    """prompt [B, S] -> [B, S + n]; n < max_new_tokens at model.max_seq_len or once every row has sampled stop_id."""
    batch, prompt_len = prompt.shape
    if prompt_len > model.cfg.max_seq_len:
        raise ValueError(f"the prompt is {prompt_len} tokens, more than model.max_seq_len = {model.cfg.max_seq_len}")
    weight = model.tok_embeddings.weight
    cache = KVCache.empty(model.cfg, batch, weight.device, weight.dtype) if use_cache else None
    tokens, cached = prompt, 0
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
    for _ in range(min(max_new_tokens, model.cfg.max_seq_len - prompt_len)):
        if cache is None:
            logits, _ = model(tokens)
        else:  # feed only the positions the cache does not hold yet: the prompt, then one token per step
            logits, _ = model(tokens[:, cached:], cache, cached)
            cached = tokens.shape[1]
        next_token = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        tokens = torch.cat([tokens, next_token], dim=1)
        if stop_id is not None:
            finished |= next_token.squeeze(1) == stop_id
            if finished.all():
                break
    return tokens


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options, checked: a bad one exits 2 with one line."""
    parser = OneLineParser(prog="python -m moe_dist.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="run dir (its latest checkpoint), checkpoints/step-<N> dir or export dir")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = all")
    parser.add_argument("--top-p", type=float, default=1.0, help="keep the most likely tokens covering p; 1 = all")
    parser.add_argument("--seed", type=int, default=None, help="for reproducible sampling")
    parser.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence every step")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    if not (args.temperature == 0 or MIN_TEMPERATURE <= args.temperature < math.inf):
        parser.error(f"--temperature {args.temperature} must be 0 (greedy) or a finite value >= {MIN_TEMPERATURE}")
    if args.top_k < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 0:
        parser.error(f"needs --top-k >= 0, 0 < --top-p <= 1 and --max-new-tokens >= 0 (got {args.top_k}, "
                     f"{args.top_p}, {args.max_new_tokens})")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    try:
        model, cfg, tokenizer_path = load_for_inference(args.checkpoint)
        if tokenizer_path is None:
            raise ExportError(f"checkpoint {args.checkpoint}: no tokenizer.json in it or in its run dir")
        tokenizer = load_tokenizer(tokenizer_path)
        eos = eos_id(tokenizer, tokenizer_path)
    except (ExportError, ConfigError, DataError, OSError) as e:
        print(error_line("generate", e), file=sys.stderr)
        return 2
    # Documents start after EOS_TOKEN in training, so the prompt does too.
    prompt_ids = [eos] + tokenizer.encode(args.prompt).ids
    if len(prompt_ids) > cfg.model.max_seq_len:
        print(f"generate: the prompt is {len(prompt_ids)} tokens (with {EOS_TOKEN} in front), "
              f"more than model.max_seq_len = {cfg.model.max_seq_len}", file=sys.stderr)
        return 2
    model.to(device)
    generator = torch.Generator(device)
    if args.seed is None:
        generator.seed()
    else:
        generator.manual_seed(args.seed)
    prompt = torch.tensor([prompt_ids], device=device)

    start = time.perf_counter()
    tokens = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, generator,
                      use_cache=not args.no_kv_cache, stop_id=eos)
    new_ids = tokens[0, len(prompt_ids):].tolist()  # waits for the device
    elapsed = time.perf_counter() - start

    text_ids = new_ids[: new_ids.index(eos)] if eos in new_ids else new_ids
    print(args.prompt + tokenizer.decode(text_ids))
    if eos in new_ids:
        stop = EOS_TOKEN
    elif len(new_ids) < args.max_new_tokens:
        stop = f"model.max_seq_len = {cfg.model.max_seq_len}"
    else:
        stop = "--max-new-tokens"
    print(f"generate: {len(new_ids)} tokens in {elapsed:.2f} s, {len(new_ids) / max(elapsed, 1e-9):.1f} tokens/s "
          f"({'no ' if args.no_kv_cache else ''}KV cache, {device.type}), stopped at {stop}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
