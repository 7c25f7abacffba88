"""Console progress on rank 0 and runs/<name>/metrics.jsonl: loss, lr, tokens/s, MFU, expert load."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch


def expert_load_imbalance(load: torch.Tensor) -> float:
    """max / mean tokens per expert, worst layer first: 1.0 is perfectly balanced. load [layers, experts]."""
    mean = load.float().mean(-1).clamp(min=1e-9)
    return (load.float().amax(-1) / mean).max().item()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsLogger:
    """Rank 0 prints one line per log interval and appends every record to metrics.jsonl; other ranks do nothing."""

    def __init__(self, run_dir: Path, rank: int, total_steps: int, start_step: int, tokens_per_step: int,
                 flops_per_token: int):
        self.enabled = rank == 0
        self.total_steps = total_steps
        self.start_step = start_step
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.start = time.perf_counter()
        self.last_time, self.last_step = 0.0, start_step  # throughput is measured between log lines
        self.file = open(run_dir / "metrics.jsonl", "a") if self.enabled else None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def write(self, record: dict) -> None:
        if self.enabled:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def train(self, step: int, metrics: dict) -> None:
        now = self.elapsed()
        tokens_per_s = self.tokens_per_step * (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        metrics = {**metrics, "tokens_per_s": tokens_per_s, "flops_per_s": tokens_per_s * self.flops_per_token}
        self.write({"kind": "train", "step": step, "elapsed": round(now, 3), **metrics})
        if not self.enabled:
            return
        done = max(1, step - self.start_step)
        eta = self.elapsed() / done * (self.total_steps - step)
        line = (f"step {step:>5}/{self.total_steps} | loss {metrics['loss']:.4f} | aux {metrics['aux_loss']:.4f}"
                f" | lr {metrics['lr']:.2e} | gnorm {metrics['grad_norm']:.3f}"
                f" | {metrics['tokens_per_s']:,.0f} tok/s")
        if "expert_load_max_mean" in metrics:
            line += f" | load max/mean {metrics['expert_load_max_mean']:.2f}"
        print(f"{line} | {_clock(self.elapsed())} elapsed, ETA {_clock(eta)}", flush=True)

    def eval(self, step: int, loss: float) -> None:
        self.write({"kind": "eval", "step": step, "elapsed": round(self.elapsed(), 3), "val_loss": loss,
                    "val_perplexity": _perplexity(loss)})
        if self.enabled:
            print(f"eval step {step:>5} | val loss {loss:.4f} | val ppl {_perplexity(loss):.2f}", flush=True)

    def close(self) -> None:
        if self.file:
            self.file.close()


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))
