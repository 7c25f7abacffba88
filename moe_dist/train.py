"""python -m moe_dist.train: train a MoE transformer; run it under torchrun for several processes."""

from __future__ import annotations

import math
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule

from moe_dist.checkpoint import CheckpointError, latest_checkpoint, step_dir_name
from moe_dist.cli import error_line
from moe_dist.config import Config, ConfigError, parse_args
from moe_dist.data import DataError
from moe_dist.data.flags import IGNORE
from moe_dist.data.loader import Batch
from moe_dist.data.mixture import build_loaders
from moe_dist.files import WriteError
from moe_dist.hf.config import with_init_from
from moe_dist.lifetime import exit_with_parent
from moe_dist.metrics import MetricsLogger, expert_load_metrics
from moe_dist.model import Routing, Transformer, moe_layers
from moe_dist.model.transformer import is_moe_layer
from moe_dist.optim import build_optimizer, build_scheduler, resume_schedule
from moe_dist.parallel import clip_grad_norm_, local_part, parallelize
from moe_dist.parallel.materialize import BlockReader, materialize
from moe_dist.parallel.mesh import Runtime, build_mesh, exit_process, init_distributed, resolve_mesh
from moe_dist.params import count_params, training_flops_per_token
from moe_dist.run_lock import RunInUseError
from moe_dist.startup import RunError, RunStart, check_run, claim_run



class DivergedError(RuntimeError):
    """Too many non-finite steps in a row; one line naming the steps and the last good checkpoint."""


@dataclass
class StepResult:
    loss: float  # cross-entropy, mean over the global batch's targets that count; nan when none counts
    aux_loss: float
    grad_norm: float
    expert_load: Tensor | None  # [moe layers, experts] pairs routed in this step, all ranks
    dropped: Tensor | None  # [moe layers] pairs dropped by capacity in this step, all ranks
    targets: int  # targets that count in the global batch; 0: nothing to learn from, no update was made
    skipped: bool = False  # the loss or the gradient was not finite: no update was made
    source_losses: list[float] = field(default_factory=list)  # per mixture source (data.mixture), nan without targets


def sum_over_ranks(value: Tensor) -> Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


def loss_fn(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over the targets that count (IGNORE marks the others)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


def token_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """[B, S] cross-entropy of each target, 0 where it does not count. Their sum divided by the global batch's count,
    not a mean per rank, is the single-process loss whatever each rank holds."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                           reduction="none").view(targets.shape)


def loss_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed cross-entropy over the targets that count."""
    return token_losses(logits, targets).sum()


def forward(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor, Routing | None]:
    return model(batch.inputs, segments=batch.segments, positions=batch.positions, routing=True)


def accumulate_gradients(model: nn.Module, micro_batches: list[Batch], sources: int = 0) -> StepResult:
    """Forward and backward over `micro_batches` (gradient accumulation): the gradients of the loss, which is the
    sum over every target that counts in the global batch (all ranks, all micro-batches) divided by their global
    count, so masks that leave ranks with different counts still give the single-process loss and gradients.
    Returns the step's loss (and each of `sources` mixture sources' loss), aux loss and routing counts (grad_norm
    not yet known: nan)."""
    model.train()
    micro_batches = [Batch(*b) for b in micro_batches]
    world = dist.get_world_size() if dist.is_initialized() else 1
    counted = sum_over_ranks(torch.stack([(b.targets != IGNORE).sum() for b in micro_batches]).sum().float())
    # FSDP averages gradients over the ranks: scaling by world makes that average the gradient of the global sum.
    scale = world / counted.clamp(min=1)
    ce_sum = aux_sum = torch.zeros(())
    by_source = torch.zeros(2, sources)  # summed cross-entropy and targets that count, per mixture source
    routings = []  # each micro-batch's; none without MoE layers
    for i, batch in enumerate(micro_batches):
        if isinstance(model, FSDPModule):  # reduce gradients once, after the last micro-batch
            model.set_requires_gradient_sync(i == len(micro_batches) - 1)
        logits, aux_loss, routing = forward(model, batch)
        losses = token_losses(logits, batch.targets)
        ce = losses.sum()
        (ce * scale.to(ce.device) + aux_loss / len(micro_batches)).backward()
        ce_sum = ce_sum + ce.detach().cpu()
        aux_sum = aux_sum + aux_loss.detach().cpu()
        if sources:
            per_sequence = torch.stack([losses.detach().sum(1), (batch.targets != IGNORE).sum(1).float()]).cpu()
            by_source.index_add_(1, batch.source.cpu(), per_sequence)
        if routing is not None:
            routings.append(routing)
    # The routers reduce the expert load over the ranks already; the dropped pairs are summed over them here.
    load = torch.stack([r.counts for r in routings]).sum(0).cpu() if routings else None
    dropped = torch.stack([r.dropped for r in routings]).sum(0).cpu().float() if routings else torch.zeros(0)
    totals = sum_over_ranks(torch.cat([torch.stack([ce_sum, aux_sum / len(micro_batches)]), dropped,
                                       by_source.flatten()]))
    targets, aux = int(counted.item()), (totals[1] / world).item()
    loss = (totals[0] / targets).item() if targets else math.nan
    dropped, by_source = totals[2:2 + len(dropped)], totals[2 + len(dropped):].view(2, sources)
    source_losses = [(ce / n).item() if n else math.nan for ce, n in by_source.T]
    return StepResult(loss, aux, math.nan, load, dropped.long() if routings else None, targets,
                      source_losses=source_losses)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, micro_batches: list[Batch],
               max_grad_norm: float, sources: int = 0) -> StepResult:
    """One optimizer step over `micro_batches` (accumulate_gradients), then the router bias update.

    A global batch with no target that counts, or a non-finite loss or gradient norm (all global, so every rank
    agrees), skips the update.
    """
    result = accumulate_gradients(model, micro_batches, sources)
    if result.targets == 0:  # the gradient would be the aux loss's alone: nothing to learn from
        optimizer.zero_grad(set_to_none=True)
        return result
    result.grad_norm = clip_grad_norm_(list(model.parameters()), max_grad_norm)
    if not (math.isfinite(result.loss) and math.isfinite(result.grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        result.skipped = True
        return result
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    for layer, counts in zip(moe_layers(model), result.expert_load if result.expert_load is not None else []):
        layer.router.update_expert_bias(counts.to(layer.router.expert_bias.device))
    return result


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[Batch]) -> tuple[float, int]:
    """(validation cross-entropy, the count of targets that count) over `batches` and all ranks: the loss is the sum
    over the targets that count / their count; nan when none counts."""
    model.eval()
    total = torch.zeros(2)
    for batch in map(lambda b: Batch(*b), batches):
        logits = forward(model, batch)[0]
        total += torch.stack([loss_sum(logits, batch.targets).cpu(), (batch.targets != IGNORE).sum().cpu()])
    total = sum_over_ranks(total)
    targets = int(total[1].item())
    return (total[0] / targets).item() if targets else math.nan, targets


def build_model(cfg: Config, mesh: DeviceMesh, runtime: Runtime, read: BlockReader | None = None) -> nn.Module:
    """Built on the meta device, parallelized, then only this rank's shards allocated and filled from `read` (a
    Hugging Face checkpoint's) or initialised: then the full weights equal the single-process
    Transformer(cfg.model, cfg.moe, seed=cfg.train.seed) at every world size and layout, bit for bit. The same
    path on CPU and GPU."""
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.moe, seed=cfg.train.seed)
    parallelize(model, cfg.parallel, mesh, runtime.device, tokens_per_rank=cfg.data.micro_batch * cfg.data.seq_len)
    materialize(model, runtime.device, read)
    return model


def to_device(batch: Batch, device: torch.device) -> Batch:
    return Batch(*(t if t is None else t.to(device, non_blocking=True) for t in batch))


@torch.no_grad()
def weights_finite(model: nn.Module) -> bool:
    """Every rank's shard of every parameter is finite (one all-reduce): weights that are not are never saved."""
    local = [local_part(p).isfinite().all() for p in model.parameters()]
    flag = torch.stack(local).all().float().cpu().reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag.item() == 1.0


class Preemption:
    """SIGTERM (how clusters preempt) asks every rank to checkpoint and exit at the end of the step."""

    def __init__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)


class Trainer:
    """One run: set up from a checked start, then the loop, then one of three endings."""

    def __init__(self, cfg: Config, runtime: Runtime, resume: bool, overwrite: bool):
        self.cfg, self.runtime = cfg, runtime
        torch.manual_seed(cfg.train.seed)
        mesh = build_mesh(cfg, runtime.world_size, runtime.device.type)
        start = check_run(cfg, runtime.rank, runtime.world_size, resume, overwrite, announce=runtime.rank == 0)
        # Weights are read, and train.init_from's checked (a NaN), before the run dir's first write.
        self.model = build_model(cfg, mesh, runtime, start.init_weights and start.init_weights.read)
        self.lock = claim_run(cfg, start, runtime.rank, overwrite)
        try:
            self._set_up(start, mesh)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Let go of the run dir (rank 0's lock): the run writes nothing more."""
        if self.lock is not None:
            self.lock.close()

    def _set_up(self, start: RunStart, mesh: DeviceMesh) -> None:
        cfg, runtime = self.cfg, self.runtime
        self.run_dir, self.checkpointer = start.run_dir, start.checkpointer
        d = cfg.data
        self.train_data, self.val_data = build_loaders(d, start.data_dir, runtime.rank, runtime.world_size)
        self.sources = [name for name, _, _ in self.val_data if name]  # a mixture's, by Batch.source
        self.optimizer = build_optimizer(self.model, cfg.optim, runtime.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        self.step = self.tokens = 0
        if start.checkpoint is not None:
            state = self.checkpointer.load(start.checkpoint, self.model, self.optimizer, self.scheduler)
            resume_schedule(self.scheduler)  # this config's schedule (a longer or branched run's) from here on
            self.step, self.tokens = int(state["step"]), int(state["tokens"])
            same_weights = self.train_data.load_state_dict(state["data"])
            if self.sources and not same_weights and runtime.rank == 0:
                print(f"data: data.mixture's weights differ from the checkpoint's: every source continues from its "
                      f"own position, and the shares count afresh from step {self.step}", flush=True)
        if runtime.rank == 0:
            total, active = count_params(cfg)["total"]
            print(f"{cfg.train.name}: {total:,} parameters ({active:,} active) | {runtime.world_size} ranks = "
                  f"dp_shard {mesh.shape[0]} x ep {mesh.shape[1]} on {runtime.device.type} | data "
                  f"{', '.join(f'{n} {w:.3g}' for n, w, _ in self.val_data) if self.sources else start.data_dir}",
                  flush=True)
        # An evaluation reads each val window at most once: beyond the split, more steps would only repeat it.
        self.eval_steps = [min(cfg.train.eval_steps, val.global_batches()) for _, _, val in self.val_data]
        for (name, _, _), steps in zip(self.val_data, self.eval_steps):
            if steps < cfg.train.eval_steps and runtime.rank == 0:
                print(f"train.eval_steps = {cfg.train.eval_steps} is more than the {steps} global batches of the val "
                      f"split{f' of {name}' if name else ''} at {runtime.world_size} ranks: each evaluation reads "
                      f"those", flush=True)
        self.tokens_per_step = runtime.world_size * d.micro_batch * d.seq_len * cfg.train.grad_accum
        self.logger = MetricsLogger(self.run_dir, runtime.rank, cfg.train.steps, self.step, self.tokens_per_step,
                                    training_flops_per_token(cfg), cfg.metrics.tensorboard)
        self.moe_layer_ids = [i for i in range(cfg.model.n_layers) if is_moe_layer(i, cfg.moe)]
        self.start_step = self.step
        self.first_loss: float | None = None

    def agree(self, stop_requested: bool = False) -> bool:
        """One all-reduce: True on every rank when any rank was asked to stop (SIGTERM reaches ranks at different
        steps); WriteError on every rank, not only rank 0, when rank 0 could not write the metrics (a full disk)."""
        flags = torch.tensor([float(stop_requested), float(self.logger.failure is not None)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[1] > 0:
            raise WriteError(self.logger.failure or "train: rank 0 could not write the metrics")
        return flags[0].item() > 0

    def evaluate(self) -> float:
        """The validation loss; for a mixture, each source's and their mean weighted as the mixture is."""
        losses, weights = {}, {}
        for (name, weight, val), steps in zip(self.val_data, self.eval_steps):
            batches = [to_device(next(val), self.runtime.device) for _ in range(steps)]
            val.reset()
            loss, targets = evaluate(self.model, batches)
            if targets == 0 and self.runtime.rank == 0:
                print(f"warning: step {self.step}: the validation batches{f' of {name}' if name else ''} "
                      f"(train.eval_steps = {steps}) have no target that counts: no validation loss", file=sys.stderr,
                      flush=True)
            if targets:
                losses[name], weights[name] = loss, weight
        loss = sum(losses[n] * weights[n] for n in losses) / sum(weights.values()) if losses else math.nan
        self.logger.eval(self.step, loss, {name: value for name, value in losses.items() if name})
        return loss

    def save_if_good(self, result: StepResult | None) -> bool:
        """Checkpoint the current step unless its update was skipped or the weights are not finite."""
        if (result is not None and result.skipped) or not weights_finite(self.model):
            return False
        self.checkpointer.save(self.step, self.model, self.optimizer, self.scheduler,
                               {"step": self.step, "tokens": self.tokens, "data": self.train_data.state_dict()})
        return True

    def last_good_checkpoint(self) -> str:
        self.checkpointer.wait()
        good = latest_checkpoint(self.checkpointer.root)
        return str(good) if good is not None else "none (no checkpoint was saved)"

    def log_step(self, result: StepResult, nonfinite_in_a_row: int, final: bool) -> None:
        """metrics.jsonl and the console line at log steps and the final one; a warning on stderr for a step without
        an update."""
        first, empty = self.step == self.start_step + 1, result.targets == 0
        if self.step % self.cfg.metrics.log_interval == 0 or first or final or result.skipped or empty:
            metrics = {"loss": result.loss, "aux_loss": result.aux_loss, "lr": self.scheduler.get_last_lr()[0],
                       "grad_norm": result.grad_norm, "tokens": self.tokens, "targets": result.targets,
                       "skipped": result.skipped or empty}
            if result.expert_load is not None:
                metrics.update(expert_load_metrics(result.expert_load, result.dropped, self.moe_layer_ids))
            if self.sources:
                metrics.update({f"loss/{name}": loss for name, loss in zip(self.sources, result.source_losses)})
                metrics.update({f"tokens/{name}": n for name, n in self.train_data.tokens_taken().items()})
            self.logger.train(self.step, metrics)
        if result.skipped and self.runtime.rank == 0:
            print(f"warning: step {self.step}: non-finite loss {result.loss} or gradient norm {result.grad_norm}: "
                  f"update skipped ({nonfinite_in_a_row} in a row; train.max_nonfinite_steps = "
                  f"{self.cfg.train.max_nonfinite_steps})", file=sys.stderr, flush=True)
        if empty and self.runtime.rank == 0:
            print(f"warning: step {self.step}: the global batch has no target that counts (every target is masked "
                  f"out): no loss, update skipped", file=sys.stderr, flush=True)

    def loop(self) -> tuple[str, StepResult | None]:
        """Train to the last step; returns how it ended ("finished", "preempted" or "diverged") and the last result."""
        cfg, result, nonfinite_in_a_row = self.cfg, None, 0
        last = min(cfg.train.steps, cfg.train.stop_after or cfg.train.steps)
        preemption = Preemption()
        try:
            while self.step < last:
                batches = [to_device(next(self.train_data), self.runtime.device) for _ in range(cfg.train.grad_accum)]
                result = train_step(self.model, self.optimizer, self.scheduler, batches, cfg.optim.grad_clip,
                                    len(self.sources))
                self.step, self.tokens = self.step + 1, self.tokens + self.tokens_per_step
                self.first_loss = result.loss if self.first_loss is None else self.first_loss
                nonfinite_in_a_row = nonfinite_in_a_row + 1 if result.skipped else 0
                self.checkpointer.poll()
                preempted = self.agree(preemption.requested)
                self.log_step(result, nonfinite_in_a_row, final=preempted or self.step == last)
                if self.sources:  # a mixture source that ran out during this step starts over
                    for name, epoch in self.train_data.repeats:
                        self.logger.repeat(self.step, name, epoch)
                    self.train_data.repeats.clear()
                if nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                    return "diverged", result
                if preempted:
                    return "preempted", result
                if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0 and self.step != last:
                    self.save_if_good(result)
                if cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0 and self.step != last:
                    self.evaluate()
            return "finished", result
        finally:
            preemption.restore()

    def run(self) -> dict:
        """The loop and its ending; returns the summary that rank 0 prints."""
        try:
            return self._run()
        finally:
            self.release()

    def _run(self) -> dict:
        ending, result = self.loop()
        if ending == "diverged":
            self.logger.close()
            raise DivergedError(f"train: {self.cfg.train.max_nonfinite_steps} non-finite steps in a row (steps "
                                f"{self.step - self.cfg.train.max_nonfinite_steps + 1}-{self.step}): stopped; the "
                                f"last good checkpoint is {self.last_good_checkpoint()}")
        saved = self.save_if_good(result) if self.step > self.start_step or ending == "preempted" else True
        val_loss = self.evaluate() if ending == "finished" else None
        self.checkpointer.wait()
        self.logger.close()
        self.agree()
        return {"steps": self.step, "tokens": self.tokens, "first_loss": self.first_loss, "ending": ending,
                "final_loss": result.loss if result else None, "val_loss": val_loss, "run_dir": str(self.run_dir),
                "elapsed_s": round(self.logger.elapsed(), 1), "world_size": self.runtime.world_size,
                "unsaved": None if saved else self.last_good_checkpoint()}


def _print_summary(summary: dict) -> None:
    if summary["unsaved"] is not None:
        print(f"warning: step {summary['steps']} was not saved (its update was skipped or its weights are not "
              f"finite); the last good checkpoint is {summary['unsaved']}", file=sys.stderr, flush=True)
    if summary["ending"] == "preempted":
        saved = Path(summary["run_dir"]) / "checkpoints" / step_dir_name(summary["steps"])
        print(f"SIGTERM: {'not saved' if summary['unsaved'] else f'saved {saved}'}, exiting", flush=True)
    if summary["ending"] == "preempted" or summary["final_loss"] is None:
        print(f"stopped at step {summary['steps']} | run in {summary['run_dir']}", flush=True)
        return
    print(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['elapsed_s']} s "
          f"on {summary['world_size']} ranks | train loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}"
          f" | val loss {summary['val_loss']:.4f} | run in {summary['run_dir']}", flush=True)


EXPECTED_ERRORS = (ConfigError, DataError, CheckpointError, RunError, RunInUseError, DivergedError, WriteError,
                   OSError)
FAILED_RUN = (DivergedError, WriteError)  # exit code 1: the input was fine, the run could not go on


def main(argv: list[str] | None = None) -> int:
    quiet = os.environ.get("RANK", "0") != "0"
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a rank under torchrun ends with it, however torchrun ends
        exit_with_parent()
    summary = None
    try:
        name, overrides, options = parse_args(sys.argv[1:] if argv is None else argv, "train",
                                              {"resume": False, "overwrite": False, "preflight": False})
        if "resume" in options and "overwrite" in options:
            raise ConfigError("train: --resume and --overwrite exclude each other")
        cfg = with_init_from(name or "tiny", overrides)
        overwrite = "overwrite" in options
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
            # torchrun restarted every rank after one died: continue what this job wrote, never wipe it.
            cfg.checkpoint.resume, overwrite = "auto", False
        # torchrun's WORLD_SIZE is known before any process group: a mesh that does not fit fails here.
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        cfg.parallel = resolve_mesh(cfg.parallel, cfg.moe.num_experts, world_size)
        if "preflight" in options:  # the launchers' check, in one process before torchrun starts the ranks
            check_run(cfg, 0, world_size, "resume" in options, overwrite)
            return 0
        runtime = init_distributed(cfg.train.device)
        summary = Trainer(cfg, runtime, resume="resume" in options, overwrite=overwrite).run()
    except EXPECTED_ERRORS as e:
        if not quiet:
            print(error_line("train", e), file=sys.stderr)
        return 1 if isinstance(e, FAILED_RUN) else 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if not quiet:
        _print_summary(summary)
    return 0


if __name__ == "__main__":
    exit_process(main())
