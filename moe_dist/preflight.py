"""Checks that run before a training run writes anything: its run dir, the checkpoint, the tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

from moe_dist.checkpoint import CheckpointError
from moe_dist.config import Config, ConfigError, load_config
from moe_dist.data import DataError
from moe_dist.data.prep import read_manifest
from moe_dist.data.tokenizer import file_hash


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
