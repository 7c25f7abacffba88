"""Console progress on rank 0, runs/<name>/metrics.jsonl and TensorBoard: loss, lr, tokens/s, expert load."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch

from moe_dist.files import refused_write


def expert_load_metrics(load: torch.Tensor, dropped: torch.Tensor, layer_ids: list[int]) -> dict:
    """Per MoE layer (keyed by its block index): tokens per expert, max / mean (1.0 = balanced), dropped pairs.

    load [layers, experts], dropped [layers], both summed over the step's micro-batches and all ranks.
    """
    load = load.float()
    max_mean = load.amax(-1) / load.mean(-1).clamp(min=1e-9)
    keys = [str(i) for i in layer_ids]
    return {"expert_load": dict(zip(keys, load.long().tolist())),
            "expert_load_max_mean": dict(zip(keys, max_mean.tolist())),
            "dropped": dict(zip(keys, dropped.tolist()))}


def drop_torn_tail(path: Path, block: int = 1 << 16) -> None:
    """A run killed while writing leaves a partial last line: cut it, so that the next record starts a line."""
    if not path.exists():
        return
    with open(path, "r+b") as f:
        end = f.seek(0, 2)
        position = end
        while position > 0:
            start = max(0, position - block)
            f.seek(start)
            chunk = f.read(position - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                if start + newline + 1 < end:
                    f.truncate(start + newline + 1)
                return
            position = start
        f.truncate(0)  # not one complete line


def _finite_or_none(value: object) -> object:
    """JSON has no NaN or infinity: a skipped step's loss is written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsLogger:
    """Rank 0 prints a line per log interval and writes every record to metrics.jsonl (and TensorBoard)."""

    def __init__(self, run_dir: Path, rank: int, total_steps: int, start_step: int, tokens_per_step: int,
                 flops_per_token: int, tensorboard: bool = False):
        self.enabled = rank == 0
        self.total_steps = total_steps
        self.start_step = start_step
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.start = time.perf_counter()
        self.last_time, self.last_step = 0.0, start_step  # throughput is measured between log lines
        self.file = None
        self.failure: str | None = None  # a write the filesystem refused; the trainer stops every rank on it
        if self.enabled:
            drop_torn_tail(run_dir / "metrics.jsonl")
            self.file = open(run_dir / "metrics.jsonl", "a")
        self.tensorboard = None
        if self.enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional: config validation checked it is there

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def write(self, record: dict) -> None:
        if not self.enabled or self.failure is not None:
            return
        try:
            self.file.write(json.dumps({k: _finite_or_none(v) for k, v in record.items()}) + "\n")
            self.file.flush()
        except OSError as e:
            self.failure = refused_write("train", e, self.file.name)
            with contextlib.suppress(OSError):  # what is still buffered cannot be written either
                self.file.close()
            self.file = None
            return
        if self.tensorboard is not None:
            for name, value in record.items():
                if isinstance(value, dict):  # per MoE layer
                    for layer, v in value.items():
                        if not isinstance(v, list):
                            self.tensorboard.add_scalar(f"moe/{name}/layer{layer}", v, record["step"])
                elif isinstance(value, (int, float)) and name != "step":
                    self.tensorboard.add_scalar(f"{record['kind']}/{name}", value, record["step"])

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
        sources = [(key[5:], value) for key, value in metrics.items() if key.startswith("loss/")]
        if sources:  # a mixture's sources
            line += " | " + " ".join(f"{name} {value:.4f}" for name, value in sources)
        if "expert_load_max_mean" in metrics:
            line += f" | load max/mean {max(metrics['expert_load_max_mean'].values()):.2f}"
            if any(metrics["dropped"].values()):
                line += f" | dropped {sum(metrics['dropped'].values())}"
        print(f"{line} | {_clock(self.elapsed())} elapsed, ETA {_clock(eta)}", flush=True)

    def eval(self, step: int, loss: float, source_losses: dict[str, float] | None = None) -> None:
        """The validation loss, and a mixture's per source."""
        source_losses = source_losses or {}
        self.write({"kind": "eval", "step": step, "elapsed": round(self.elapsed(), 3), "val_loss": loss,
                    "val_perplexity": _perplexity(loss), **{f"val_loss/{n}": v for n, v in source_losses.items()}})
        if self.enabled:
            per_source = "".join(f" | {name} {value:.4f}" for name, value in source_losses.items())
            print(f"eval step {step:>5} | val loss {loss:.4f} | val ppl {_perplexity(loss):.2f}{per_source}",
                  flush=True)

    def repeat(self, step: int, source: str, epoch: int) -> None:
        """A mixture source ran out in this step and starts its windows over (its epoch `epoch`, from 0)."""
        self.write({"kind": "data", "step": step, f"epoch/{source}": epoch})
        if self.enabled:
            print(f"data: source {source} ran out at step {step}: it repeats (epoch {epoch})", flush=True)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))
