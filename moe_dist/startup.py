"""Everything before a run's first step: the data, the run dir, the checkpoint to resume or branch from.

All of it is checked before anything is written: once by the launchers in one process (`--preflight`,
before torchrun starts the ranks), and again on every rank. A run dir has one writer: rank 0 holds its lock
(moe_dist.run_lock) from before its first write to the end of the run. Bad input stops the run with one line and
leaves earlier runs, checkpoints and data as they were. A run dir is ours when it holds RUN_MARKER;
`--overwrite` removes only the entries a run writes (RUN_FILES), never through a symbolic link.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from moe_dist.checkpoint import Checkpointer, CheckpointError, latest_checkpoint, read_complete
from moe_dist.config import Config, ConfigError, load_config, to_toml
from moe_dist.data import DataError
from moe_dist.data.corpus import default_corpus
from moe_dist.data.loader import check_compatible
from moe_dist.data.manifest import read_manifest
from moe_dist.data.mixture import check_mixture
from moe_dist.data.tokenizer import TOKENIZER_CONFIG, file_hash
from moe_dist.files import unwritable_reason
from moe_dist.hf.config import SOURCE_TOKEN_IDS, hf_tokenizer, source_token_ids
from moe_dist.hf.upcycle import UpcycledWeights
from moe_dist.hf.weights import HFWeights, open_init_weights
from moe_dist.optim import lr_factor
from moe_dist.parallel.agreement import first_problem
from moe_dist.run_lock import RunInUseError, RunLock, refuse_if_live


class RunError(RuntimeError):
    """A run that must not start or go on; the message is one line naming the path or value."""


RUN_MARKER = "moe_dist-run.json"
RUN_FILES = ("config.toml", "metrics.jsonl", "tokenizer.json", "tokenizer_config.json", SOURCE_TOKEN_IDS, "checkpoints",
             "tensorboard", "plots")
# What fixes the parameters' shapes: a checkpoint only loads into a model with the same values.
SHAPE_KEYS = ("model.vocab_size", "model.dim", "model.n_layers", "model.n_heads", "model.n_kv_heads",
              "model.ffn_hidden", "moe.num_experts", "moe.expert_hidden", "moe.shared_expert_hidden",
              "moe.first_k_dense", "moe.every_n_layers", "moe.dense_layers", "model.head_dim", "model.qkv_bias",
              "model.qk_norm", "moe.shared_expert_gate")


@dataclass
class RunStart:
    run_dir: Path
    data_dir: Path
    checkpointer: Checkpointer
    checkpoint: Path | None  # the verified checkpoint to resume (or branch) from; None: start fresh
    init_weights: HFWeights | UpcycledWeights | None  # train.init_from's, checked against the model; None resuming


def run_entries(run_dir: Path) -> list[Path]:
    """The entries of RUN_FILES that exist in run_dir (a dangling link counts)."""
    return [run_dir / name for name in RUN_FILES if os.path.lexists(run_dir / name)]


def _check_removable(run_dir: Path) -> None:
    """RunError before anything is deleted if --overwrite could not remove every run entry inside run_dir."""
    for entry in run_entries(run_dir):
        if entry.is_symlink():
            raise RunError(f"train: --overwrite: {entry} is a symbolic link; moe_dist removes only what it wrote "
                           f"inside the run dir, never through a link: move or remove it yourself")
        for root, _, _ in os.walk(entry) if entry.is_dir() else []:
            if not os.access(root, os.W_OK | os.X_OK):
                raise RunError(f"train: --overwrite: cannot remove the files in {root} (no write permission); "
                               f"nothing was removed")


def check_run_dir(run_dir: Path, resuming: bool, overwrite: bool) -> None:
    """RunError when this run must not write to run_dir: not ours, would be overwritten unasked, not writable."""
    if os.path.lexists(run_dir) and not run_dir.is_dir():
        raise RunError(f"train: {run_dir} exists and is not a directory; choose another --train.name")
    found = [p.name for p in run_entries(run_dir)]
    if found and not (run_dir / RUN_MARKER).is_file():
        raise RunError(f"train: {run_dir} holds {', '.join(found)} but no {RUN_MARKER}, so it is not a moe_dist run "
                       f"dir and nothing in it is touched; choose another --train.name (a run of an older moe_dist: "
                       f"create {RUN_MARKER} there to adopt it)")
    refuse_if_live("train", run_dir)  # before anything of a live run is read, resumed from or overwritten
    if found and not resuming and not overwrite:
        raise RunError(f"train: {run_dir} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                       f"--overwrite to replace it, or choose another --train.name")
    if overwrite:
        _check_removable(run_dir)
    for path in (run_dir, run_dir / "checkpoints"):
        reason = unwritable_reason(path)
        if reason is not None:
            raise RunError(f"train: cannot write the run dir {run_dir}: {reason}")


def clear_run_dir(run_dir: Path) -> None:
    """--overwrite: remove an earlier run's entries (only RUN_FILES; checked by _check_removable first)."""
    for path in run_entries(run_dir):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _get(cfg: Config, key: str) -> object:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def check_checkpoint_compatible(checkpoint: Path, cfg: Config) -> Config:
    """CheckpointError naming the first model key whose value differs from the checkpoint's config; returns that
    config. Anything else (train.steps, the schedule) may change."""
    try:
        saved = load_config(str(checkpoint / "config.toml"))
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {checkpoint}: unreadable config.toml ({e})") from None
    for key in SHAPE_KEYS:
        if _get(saved, key) != _get(cfg, key):
            raise CheckpointError(f"checkpoint {checkpoint}: {key} = {_get(saved, key)!r} there, "
                                  f"{_get(cfg, key)!r} in this config; resume with the checkpoint's model "
                                  f"or start a new run (--train.name)")
    if bool(saved.data.mixture) != bool(cfg.data.mixture):  # the loaders' positions are of different kinds
        there, here = ("data.mixture", "one dataset") if saved.data.mixture else ("one dataset", "data.mixture")
        raise CheckpointError(f"checkpoint {checkpoint}: trained on {there} there, {here} in this config: its data "
                              f"position cannot continue; resume with its data or start a new run (--train.name)")
    if saved.optim.name != cfg.optim.name:  # AdamW's two moments per parameter, or Muon's momentum and AdamW's
        raise CheckpointError(f"checkpoint {checkpoint}: optim.name = {saved.optim.name!r} there, "
                              f"{cfg.optim.name!r} in this config: its optimizer state is of the other kind; resume "
                              f"with --optim.name {saved.optim.name}, or start a new run (--train.name) from its "
                              f"weights (python -m moe_dist.export, then --train.init_from)")
    return saved


def schedule_change(saved: Config, step: int, cfg: Config) -> str | None:
    """A warning when `step` is inside the decay of the checkpoint's schedule and this config's schedule gives
    another lr there (a WSD run extended after its decay began): the lr jumps."""
    before = lr_factor(step, saved.optim, saved.train.steps)
    after = lr_factor(step, cfg.optim, cfg.train.steps)
    if step < saved.optim.warmup_steps or before >= 1 or after == before:
        return None
    return (f"warning: step {step} is inside the decay of the checkpoint's schedule (optim.schedule = "
            f"{saved.optim.schedule!r}, train.steps = {saved.train.steps}): this config's schedule moves the lr "
            f"factor there from {before:.4g} to {after:.4g}")


def _announce_start(checkpoint: Path, saved: Config, cfg: Config, how: str) -> None:
    print(f"{how} {checkpoint}", flush=True)
    warning = schedule_change(saved, read_complete(checkpoint)["step"], cfg)
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)


def tokenized_with(data_dir: Path, tokenizer: Path) -> bool:
    """The prepared data in data_dir was tokenized with the tokenizer file `tokenizer`."""
    return file_hash(tokenizer) == read_manifest(data_dir)["tokenizer"]["hash"]


def check_run_tokenizer(run_dir: Path, data_dir: Path) -> None:
    """DataError when the data was tokenized with another tokenizer than the one this run trained on."""
    run_tokenizer = run_dir / "tokenizer.json"
    if run_tokenizer.is_file() and not tokenized_with(data_dir, run_tokenizer):
        raise DataError(f"data: {data_dir} was tokenized with another tokenizer than {run_tokenizer}, "
                        f"which this run was trained with")


def prepare_data(cfg: Config, world_size: int) -> Path:
    """The configured data dir, or the default corpus (built once, by whoever gets its lock first), checked
    against the model and the global batch."""
    tokenizer = hf_tokenizer(cfg.train.init_from) if cfg.train.init_from else None
    if cfg.train.init_from and tokenizer is None:  # a new tokenizer's ids would mean nothing to its embeddings
        raise DataError(f"data: train.init_from = {cfg.train.init_from} has no tokenizer.json; moe_dist tokenizes "
                        f"with the checkpoint's own tokenizer (copy it there from the model's repository)")
    if cfg.data.mixture:  # its sources repeat, so a step may hold more windows than a source: no grad_accum bound
        data_dir = check_mixture(cfg.data.mixture, cfg.model.vocab_size, cfg.data.seq_len, cfg.data.micro_batch,
                                 world_size)
    else:
        data_dir = Path(cfg.data.path) if cfg.data.path else default_corpus(
            Path(cfg.metrics.runs_dir) / "_corpus", cfg.model.vocab_size, tokenizer)
        check_compatible(data_dir, cfg.model.vocab_size, cfg.data.seq_len, cfg.data.micro_batch, world_size,
                         cfg.train.grad_accum)
    if tokenizer is not None and not tokenized_with(data_dir, tokenizer):
        raise DataError(f"data: {data_dir} was tokenized with another tokenizer than {tokenizer}, the one of "
                        f"train.init_from; prepare it with python -m moe_dist.data.prep --tokenizer "
                        f"{cfg.train.init_from}")
    return data_dir


def find_checkpoint(checkpointer: Checkpointer, cfg: Config, announce: bool) -> Path | None:
    """The checkpoint to resume from (verified, checked against this config), or None to start fresh (a branched
    run without a checkpoint of its own: at its branch point)."""
    path = checkpointer.find_resumable()
    if path is None:
        if cfg.checkpoint.resume != "auto" and not cfg.train.branch_from:  # --resume is strict; "auto" may start fresh
            raise CheckpointError(f"--resume: no checkpoint in {checkpointer.root}")
        if announce and not cfg.train.branch_from:
            print("no checkpoint to resume from: starting fresh", flush=True)
        return None
    saved = check_checkpoint_compatible(path, cfg)
    if announce:
        _announce_start(path, saved, cfg, "resuming from")
    return path


def find_branch_point(cfg: Config, run_dir: Path, data_dir: Path, checkpointer: Checkpointer,
                      announce: bool) -> Path:
    """train.branch_from's checkpoint, verified and checked against this config and data: where this new run
    starts. Only read: the source run is never written to."""
    source = Path(cfg.train.branch_from)
    key = f"train.branch_from = {source}"
    if not source.is_dir():
        raise CheckpointError(f"{key}: no such directory (a run dir, or a checkpoint dir of one)")
    if (source / RUN_MARKER).is_file():  # a run dir: its latest checkpoint
        source_run, path = source, latest_checkpoint(source / "checkpoints")
        if path is None:
            raise CheckpointError(f"{key}: that run has no checkpoint yet")
    else:
        source_run, path = source.parent.parent, source
    if path.resolve().is_relative_to(run_dir.resolve()):  # --overwrite would delete it, a resume replace it
        raise RunError(f"train: {key} is inside this run's dir {run_dir}: a branch is a new run; choose another "
                       f"--train.name")
    problem = checkpointer.verify_everywhere(path)
    if problem is not None:
        raise CheckpointError(f"{key}: {problem}")
    saved = check_checkpoint_compatible(path, cfg)
    step = read_complete(path)["step"]
    if step >= cfg.train.steps:
        raise ConfigError(f"config: train.steps = {cfg.train.steps} must be more than the step of {key} ({step})")
    tokenizer = source_run / "tokenizer.json"
    if not tokenizer.is_file():
        raise DataError(f"data: {key}: no {tokenizer}, so the data cannot be checked against that run's tokenizer")
    if not tokenized_with(data_dir, tokenizer):
        raise DataError(f"data: {data_dir} was tokenized with another tokenizer than {tokenizer}, which the run of "
                        f"{key} was trained with")
    if announce:
        _announce_start(path, saved, cfg, "branching from")
    return path


def check_run(cfg: Config, rank: int, world_size: int, resume: bool, overwrite: bool,
              announce: bool = False) -> RunStart:
    """Everything a run needs, checked without writing (but the default corpus's cache, built on first use)."""
    run_dir = Path(cfg.metrics.runs_dir) / cfg.train.name
    resuming = not overwrite and (resume or cfg.checkpoint.resume == "auto")
    # train.init_from's tensors are checked first (headers only: cheap), unless the run may resume from its own
    # checkpoint, which then replaces them: whether it does is known only further down.
    init_weights = open_init_weights(cfg) if cfg.train.init_from and not resuming else None
    data_dir = prepare_data(cfg, world_size)
    check_run_dir(run_dir, resuming, overwrite)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint, rank, world_size)
    checkpoint = None
    if resuming:
        check_run_tokenizer(run_dir, data_dir)
        checkpoint = find_checkpoint(checkpointer, cfg, announce)
    if checkpoint is None and cfg.train.branch_from:  # once it has a checkpoint of its own, a branch resumes from it
        checkpoint = find_branch_point(cfg, run_dir, data_dir, checkpointer, announce)
    if cfg.train.init_from and resuming and checkpoint is None:
        init_weights = open_init_weights(cfg)
    return RunStart(run_dir, data_dir, checkpointer, checkpoint, init_weights)


def _write_run_files(cfg: Config, start: RunStart, overwrite: bool) -> None:
    run_dir = start.run_dir
    (run_dir / RUN_MARKER).write_text(json.dumps({"moe_dist_run": 1, "writes": RUN_FILES}) + "\n")
    if overwrite:
        clear_run_dir(run_dir)
    (run_dir / "config.toml").write_text(to_toml(cfg))
    # The run carries its tokenizer, for sampling and export and to check the data it resumes on.
    shutil.copyfile(start.data_dir / read_manifest(start.data_dir)["tokenizer"]["file"], run_dir / "tokenizer.json")
    source_config = Path(cfg.train.init_from) / TOKENIZER_CONFIG if cfg.train.init_from else None
    if source_config is not None and source_config.is_file():  # names its special tokens (the EOS) for export
        shutil.copyfile(source_config, run_dir / TOKENIZER_CONFIG)
    token_ids = source_token_ids(cfg)  # export gives them back exactly, even once the source has gone
    if token_ids is not None:
        (run_dir / SOURCE_TOKEN_IDS).write_text(json.dumps(token_ids) + "\n")


def claim_run(cfg: Config, start: RunStart, rank: int, overwrite: bool) -> RunLock | None:
    """After every rank's checks (check_run) and the weights' read: rank 0 takes the run dir's lock and writes its
    first files. Returns rank 0's lock, held for the whole run."""
    dist.barrier()  # every rank has checked the run dir before rank 0 writes to it
    lock = problem = None
    if rank == 0:
        try:
            start.run_dir.mkdir(parents=True, exist_ok=True)
            # Checked above, but another trainer may have started since: the lock decides, before any write.
            lock = RunLock(start.run_dir, "train")
            _write_run_files(cfg, start, overwrite)
        except RunInUseError as e:
            problem = str(e)
        except OSError as e:  # checked above, but a filesystem can still refuse (full, read-only mount)
            problem = f"train: cannot write the run dir {start.run_dir}: {e.filename}: {e.strerror}"
    problem = first_problem(problem)  # every rank stops, not only the one that saw it
    if problem is not None:
        if lock is not None:
            lock.close()
        raise RunError(problem)
    return lock
