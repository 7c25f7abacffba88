"""Everything before a run's first step: the data, the run dir, the checkpoint to resume from.

All of it is checked, on every rank, before anything is written, so that bad input stops the run
with one line and leaves earlier runs, checkpoints and data as they were.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed as dist

from moe_dist.checkpoint import Checkpointer, CheckpointError
from moe_dist.config import Config, ConfigError, load_config, to_toml
from moe_dist.data import DataError
from moe_dist.data.corpus import default_corpus
from moe_dist.data.loader import check_compatible
from moe_dist.data.prep import read_manifest
from moe_dist.data.tokenizer import file_hash
from moe_dist.parallel.mesh import Runtime


class RunError(RuntimeError):
    """A run that must not start or go on; the message is one line naming the path or value."""


RUN_FILES = ("config.toml", "metrics.jsonl", "tokenizer.json", "checkpoints", "tensorboard")
# What fixes the parameters' shapes: a checkpoint only loads into a model with the same values.
SHAPE_KEYS = ("model.vocab_size", "model.dim", "model.n_layers", "model.n_heads", "model.n_kv_heads",
              "model.ffn_hidden", "moe.num_experts", "moe.expert_hidden", "moe.shared_expert_hidden",
              "moe.first_k_dense", "moe.every_n_layers")


def check_run_dir(run_dir: Path, resuming: bool, overwrite: bool) -> None:
    """RunError when run_dir already holds a run that this one would overwrite without being asked to."""
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if found and not resuming and not overwrite:
        raise RunError(f"train: {run_dir} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                       f"--overwrite to replace it, or choose another --train.name")


def clear_run_dir(run_dir: Path) -> None:
    """--overwrite: remove an earlier run's files (only the ones a run writes)."""
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _get(cfg: Config, key: str) -> object:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def check_checkpoint_compatible(checkpoint: Path, cfg: Config) -> None:
    """CheckpointError naming the first model key whose value differs from the checkpoint's config."""
    try:
        saved = load_config(str(checkpoint / "config.toml"))
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {checkpoint}: unreadable config.toml ({e})") from None
    for key in SHAPE_KEYS:
        if _get(saved, key) != _get(cfg, key):
            raise CheckpointError(f"checkpoint {checkpoint}: {key} = {_get(saved, key)!r} there, "
                                  f"{_get(cfg, key)!r} in this config; resume with the checkpoint's model "
                                  f"or start a new run (--train.name)")


def check_run_tokenizer(run_dir: Path, data_dir: Path) -> None:
    """DataError when the data was tokenized with another tokenizer than the one this run trained on."""
    run_tokenizer = run_dir / "tokenizer.json"
    if run_tokenizer.is_file() and file_hash(run_tokenizer) != read_manifest(data_dir)["tokenizer"]["hash"]:
        raise DataError(f"data: {data_dir} was tokenized with another tokenizer than {run_tokenizer}, "
                        f"which this run was trained with")


def prepare_data(cfg: Config) -> Path:
    """The configured data dir, or the default corpus (built once, by whichever rank gets its lock first)."""
    if cfg.data.path:
        data_dir = Path(cfg.data.path)
    else:
        data_dir = default_corpus(Path(cfg.metrics.runs_dir) / "_corpus", cfg.model.vocab_size)
    check_compatible(data_dir, cfg.model.vocab_size)
    return data_dir


def find_checkpoint(checkpointer: Checkpointer, cfg: Config) -> Path | None:
    """The checkpoint to resume from (checked against this config), or None to start fresh."""
    path = checkpointer.find_resumable()
    if path is None and cfg.checkpoint.resume != "auto":  # --resume is strict; "auto" may start fresh
        raise CheckpointError(f"--resume: no checkpoint in {checkpointer.root}")
    if path is not None:
        check_checkpoint_compatible(path, cfg)
    if checkpointer.rank == 0:
        print(f"resuming from {path}" if path else "no checkpoint to resume from: starting fresh", flush=True)
    return path


def start_run(cfg: Config, runtime: Runtime, resume: bool, overwrite: bool) -> tuple[Path, Path, Path | None]:
    """Check everything before writing anything: (run dir, data dir, checkpoint to resume from or None)."""
    run_dir = Path(cfg.metrics.runs_dir) / cfg.train.name
    data_dir = prepare_data(cfg)
    resuming = not overwrite and (resume or cfg.checkpoint.resume == "auto")
    check_run_dir(run_dir, resuming, overwrite)
    checkpoint = None
    if resuming:
        check_run_tokenizer(run_dir, data_dir)
        checkpoint = find_checkpoint(Checkpointer(run_dir, cfg.checkpoint, runtime.rank, runtime.world_size), cfg)
    dist.barrier()  # every rank has checked the run dir before rank 0 writes to it
    if runtime.rank == 0:
        if overwrite:
            clear_run_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(to_toml(cfg))
        # The run carries its tokenizer, for sampling and export and to check the data it resumes on.
        shutil.copyfile(data_dir / read_manifest(data_dir)["tokenizer"]["file"], run_dir / "tokenizer.json")
    return run_dir, data_dir, checkpoint
