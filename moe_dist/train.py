"""python -m moe_dist.train: train a MoE transformer; run it under torchrun for several processes."""

from __future__ import annotations

import math
import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from moe_dist.checkpoint import Checkpointer, CheckpointError, latest_checkpoint, step_dir_name
from moe_dist.config import Config, ConfigError, load_config, parse_args
from moe_dist.data import DataError
from moe_dist.data.loader import DataLoader
from moe_dist.metrics import MetricsLogger, expert_load_metrics
from moe_dist.model import Transformer, moe_layers
from moe_dist.model.transformer import is_moe_layer
from moe_dist.optim import build_optimizer, build_scheduler
from moe_dist.parallel import clip_grad_norm_, parallelize
from moe_dist.parallel.mesh import Runtime, build_mesh, init_distributed, mesh_shape, resolve_ep
from moe_dist.params import count_params, training_flops_per_token
from moe_dist.startup import RunError, start_run

Batch = tuple[Tensor, Tensor]


class DivergedError(RuntimeError):
    """Too many non-finite steps in a row; one line naming the steps and the last good checkpoint."""


@dataclass
class StepResult:
    loss: float  # cross-entropy, mean over the global batch
    aux_loss: float
    grad_norm: float
    expert_load: Tensor | None  # [moe layers, experts] pairs routed in this step, all ranks
    dropped: Tensor | None  # [moe layers] pairs dropped by capacity in this step, all ranks
    skipped: bool = False  # the loss or the gradient was not finite: no update was made


def sum_over_ranks(value: Tensor) -> Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


def mean_over_ranks(value: Tensor) -> float:
    world = dist.get_world_size() if dist.is_initialized() else 1
    return (sum_over_ranks(value) / world).item()


def loss_fn(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, micro_batches: list[Batch],
               max_grad_norm: float) -> StepResult:
    """One optimizer step over `micro_batches` (gradient accumulation), then the router bias update.

    A non-finite loss or gradient norm (both global, so every rank agrees) skips the update.
    """
    model.train()
    layers = moe_layers(model)
    ce_sum = aux_sum = torch.zeros(())
    load, dropped = None, torch.zeros(len(layers))
    for i, (inputs, targets) in enumerate(micro_batches):
        if isinstance(model, FSDPModule):  # reduce gradients once, after the last micro-batch
            model.set_requires_gradient_sync(i == len(micro_batches) - 1)
        logits, aux_loss = model(inputs)
        ce = loss_fn(logits, targets)
        ((ce + aux_loss) / len(micro_batches)).backward()
        ce_sum = ce_sum + ce.detach().cpu()
        aux_sum = aux_sum + aux_loss.detach().cpu()
        if layers:
            counts = torch.stack([m.last_counts for m in layers]).cpu()
            load = counts if load is None else load + counts
            dropped += torch.stack([m.last_dropped for m in layers]).cpu()
    n, world = len(micro_batches), dist.get_world_size() if dist.is_initialized() else 1
    totals = sum_over_ranks(torch.cat([torch.stack([ce_sum, aux_sum]) / n, dropped]))  # one collective
    loss, aux = (totals[:2] / world).tolist()
    dropped = totals[2:].long() if layers else None
    grad_norm = clip_grad_norm_(list(model.parameters()), max_grad_norm)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, aux, grad_norm, load, dropped, skipped=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    for layer, counts in zip(layers, load if load is not None else []):
        layer.router.update_expert_bias(counts.to(layer.router.expert_bias.device))
    return StepResult(loss, aux, grad_norm, load, dropped)


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[Batch]) -> float:
    """Mean validation cross-entropy over `batches` and all ranks."""
    model.eval()
    total = torch.zeros(())
    for inputs, targets in batches:
        logits, _ = model(inputs)
        total += loss_fn(logits, targets).cpu()
    return mean_over_ranks(total / len(batches))


def build_model(cfg: Config, mesh, runtime: Runtime) -> nn.Module:
    """Same initial weights on every rank and at every world size, then parallelized."""
    torch.manual_seed(cfg.train.seed)
    if runtime.device.type == "cpu":
        model = Transformer(cfg.model, cfg.moe)  # small enough to build whole, then shard
        return parallelize(model, cfg.parallel, mesh, runtime.device)
    with torch.device("meta"):  # large models: shard first, materialise only the local shards
        model = Transformer(cfg.model, cfg.moe)
    parallelize(model, cfg.parallel, mesh, runtime.device)
    model.to_empty(device=runtime.device)
    model.init_weights()
    return model


def to_device(batch: Batch, device: torch.device) -> Batch:
    return tuple(t.to(device, non_blocking=True) for t in batch)


class Preemption:
    """SIGTERM (how clusters preempt) asks every rank to checkpoint and exit at the end of the step."""

    def __init__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled (ranks may get the signal at different steps)."""
        flag = torch.tensor([1.0 if self.requested else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0


def train(cfg: Config, runtime: Runtime, resume: bool = False, overwrite: bool = False) -> dict:
    """The main loop. Returns the summary that rank 0 prints."""
    mesh = build_mesh(cfg.parallel, runtime.world_size, runtime.device.type)
    run_dir, data_dir, checkpoint = start_run(cfg, runtime, resume, overwrite)
    d = cfg.data
    train_data = DataLoader(data_dir, "train", d.seq_len, d.micro_batch, runtime.rank, runtime.world_size, d.seed)
    val_data = DataLoader(data_dir, "val", d.seq_len, d.micro_batch, runtime.rank, runtime.world_size, d.seed)

    model = build_model(cfg, mesh, runtime)
    optimizer = build_optimizer(model, cfg.optim, runtime.device)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint, runtime.rank, runtime.world_size)
    step, tokens = 0, 0
    if checkpoint is not None:
        state = checkpointer.load(checkpoint, model, optimizer, scheduler)
        step, tokens = int(state["step"]), int(state["tokens"])
        train_data.load_state_dict(state["data"])
    if runtime.rank == 0:
        total, active = count_params(cfg)["total"]
        print(f"{cfg.train.name}: {total:,} parameters ({active:,} active) | {runtime.world_size} ranks = "
              f"dp_shard {mesh.shape[0]} x ep {mesh.shape[1]} on {runtime.device.type} | data {data_dir}", flush=True)
    tokens_per_step = runtime.world_size * d.micro_batch * d.seq_len * cfg.train.grad_accum
    logger = MetricsLogger(run_dir, runtime.rank, cfg.train.steps, step, tokens_per_step,
                           training_flops_per_token(cfg), cfg.metrics.tensorboard)
    moe_layer_ids = [i for i in range(cfg.model.n_layers) if is_moe_layer(i, cfg.moe)]
    preemption = Preemption()

    def run_eval(at_step: int) -> float:
        batches = [to_device(next(val_data), runtime.device) for _ in range(cfg.train.eval_steps)]
        val_data.reset()
        loss = evaluate(model, batches)
        logger.eval(at_step, loss)
        return loss

    def save(at_step: int) -> None:
        checkpointer.save(at_step, model, optimizer, scheduler,
                          {"step": at_step, "tokens": tokens, "data": train_data.state_dict()})

    start_step = step
    first_loss = result = val_loss = None
    preempted = False
    nonfinite_in_a_row = 0
    last = min(cfg.train.steps, cfg.train.stop_after or cfg.train.steps)
    while step < last:
        batches = [to_device(next(train_data), runtime.device) for _ in range(cfg.train.grad_accum)]
        result = train_step(model, optimizer, scheduler, batches, cfg.optim.grad_clip)
        step, tokens = step + 1, tokens + tokens_per_step
        first_loss = result.loss if first_loss is None else first_loss
        nonfinite_in_a_row = nonfinite_in_a_row + 1 if result.skipped else 0
        checkpointer.poll()
        if step % cfg.metrics.log_interval == 0 or step in (start_step + 1, last) or result.skipped:
            metrics = {"loss": result.loss, "aux_loss": result.aux_loss, "lr": scheduler.get_last_lr()[0],
                       "grad_norm": result.grad_norm, "tokens": tokens, "skipped": result.skipped}
            if result.expert_load is not None:
                metrics.update(expert_load_metrics(result.expert_load, result.dropped, moe_layer_ids))
            logger.train(step, metrics)
        if result.skipped and runtime.rank == 0:
            print(f"warning: step {step}: non-finite loss {result.loss} or gradient norm {result.grad_norm}: "
                  f"update skipped ({nonfinite_in_a_row} in a row; train.max_nonfinite_steps = "
                  f"{cfg.train.max_nonfinite_steps})", file=sys.stderr, flush=True)
        if nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
            break
        if preemption.agreed():
            preempted = True
            break
        if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step != last and not result.skipped:
            save(step)
        if cfg.train.eval_interval and step % cfg.train.eval_interval == 0 and step != last:
            run_eval(step)
    preemption.restore()
    if nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
        checkpointer.wait()
        logger.close()
        good = latest_checkpoint(checkpointer.root)
        raise DivergedError(f"train: {nonfinite_in_a_row} non-finite steps in a row (steps "
                            f"{step - nonfinite_in_a_row + 1}-{step}): stopped; the last good checkpoint is "
                            f"{good if good is not None else 'none (no checkpoint was saved)'}")
    if step > start_step or preempted:
        save(step)
    checkpointer.wait()
    if preempted:
        if runtime.rank == 0:
            print(f"SIGTERM: saved {checkpointer.root / step_dir_name(step)}, exiting", flush=True)
    else:
        val_loss = run_eval(step)
    logger.close()
    return {"steps": step, "tokens": tokens, "first_loss": first_loss, "preempted": preempted,
            "final_loss": result.loss if result else None, "val_loss": val_loss, "run_dir": str(run_dir),
            "elapsed_s": round(logger.elapsed(), 1), "world_size": runtime.world_size}


def _print_summary(summary: dict) -> None:
    if summary["preempted"] or summary["final_loss"] is None:
        print(f"stopped at step {summary['steps']} | run in {summary['run_dir']}", flush=True)
        return
    print(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['elapsed_s']} s "
          f"on {summary['world_size']} ranks | train loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}"
          f" | val loss {summary['val_loss']:.4f} | run in {summary['run_dir']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    quiet = os.environ.get("RANK", "0") != "0"
    try:
        name, overrides, options = parse_args(sys.argv[1:] if argv is None else argv, "train",
                                              {"resume": False, "overwrite": False})
        if "resume" in options and "overwrite" in options:
            raise ConfigError("train: --resume and --overwrite exclude each other")
        cfg = load_config(name or "tiny", overrides)
        overwrite = "overwrite" in options
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
            # torchrun restarted every rank after one died: continue what this job wrote, never wipe it.
            cfg.checkpoint.resume, overwrite = "auto", False
        # torchrun's WORLD_SIZE is known before any process group: a mesh that does not fit fails here.
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        cfg.parallel.ep = resolve_ep(cfg.parallel, cfg.moe.num_experts, world_size)
        mesh_shape(cfg.parallel, world_size)
        runtime = init_distributed(cfg.train.device)
        summary = train(cfg, runtime, resume="resume" in options, overwrite=overwrite)
    except (ConfigError, DataError, CheckpointError, RunError, DivergedError) as e:
        if not quiet:
            print(e, file=sys.stderr)
        return 1 if isinstance(e, DivergedError) else 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if runtime.rank == 0:
        _print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
