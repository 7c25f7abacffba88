"""torch.distributed.checkpoint save / load / resume: atomic, keep-last-k, optionally async.

runs/<name>/checkpoints/step-<N>/ holds the DCP shards of every rank, each rank's RNG state, the
resolved config.toml and COMPLETE: a list of every file with its size, written last. A checkpoint
is written as .step-<N>.tmp and renamed when every rank has finished; `latest` (a text file
naming the newest complete checkpoint) is replaced atomically after that. A kill at any moment
leaves at worst a .tmp directory, which is never resumed from and is removed by the next save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from moe_dist.config import CheckpointConfig

COMPLETE = "COMPLETE"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A missing, incomplete or corrupt checkpoint; the message names the offending path."""


def step_dir_name(step: int) -> str:
    return f"step-{step}"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def seal(path: Path, step: int, world_size: int) -> None:
    """Write COMPLETE: every file of the checkpoint with its size, so that a lost or cut file shows."""
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    _write_atomically(path / COMPLETE, json.dumps({"step": step, "world_size": world_size, "files": files},
                                                  indent=1))


def verify(path: Path) -> None:
    """CheckpointError naming the first file that is missing or has the wrong size."""
    manifest = path / COMPLETE
    if not manifest.is_file():
        raise CheckpointError(f"checkpoint {path}: incomplete (no {COMPLETE} file)")
    for name, size in json.loads(manifest.read_text())["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: file {file} is missing")
        if file.stat().st_size != size:
            raise CheckpointError(f"checkpoint {path}: file {file} is {file.stat().st_size} bytes, expected {size}")


def complete_checkpoints(checkpoint_root: Path) -> list[Path]:
    """Finished checkpoint directories (renamed from .tmp), newest first; not yet verified."""
    if not checkpoint_root.is_dir():
        return []
    found = [p for p in checkpoint_root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def latest_checkpoint(checkpoint_root: Path) -> Path | None:
    """The checkpoint `latest` names, or None when there is none."""
    latest = checkpoint_root / LATEST
    if not latest.is_file():
        return None
    return checkpoint_root / latest.read_text().strip()


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    """Saves and restores model, optimizer, scheduler and the trainer's own state on every rank."""

    def __init__(self, run_dir: Path, cfg: CheckpointConfig, rank: int, world_size: int):
        self.root = run_dir / "checkpoints"
        self.run_dir = run_dir
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.resumed_from: Path | None = None
        self.pending: tuple[int, Future] | None = None  # an async save not yet finalised

    def _state(self, model, optimizer, scheduler, train_state: dict) -> dict:
        return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer),
                "scheduler": scheduler.state_dict(), "train": train_state}

    def save(self, step: int, model, optimizer, scheduler, train_state: dict) -> None:
        """Write checkpoint `step` (in the background when checkpoint.async_save)."""
        self.wait()
        tmp = self.root / f".{step_dir_name(step)}.tmp"
        if self.rank == 0:
            if tmp.exists():  # left by a run killed while saving
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        dist.barrier()
        torch.save(_rng_state(), tmp / f"rng-rank{self.rank}.pt")
        state = self._state(model, optimizer, scheduler, train_state)
        if self.cfg.async_save:
            self.pending = (step, dcp.async_save(state, checkpoint_id=tmp))
        else:
            dcp.save(state, checkpoint_id=tmp)
            self._finalise(step)

    def poll(self) -> None:
        """Finalise a background save once every rank's write has finished (one tiny all-reduce)."""
        if self.pending is None:
            return
        done = torch.tensor([1.0 if self.pending[1].done() else 0.0])
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if done.item() == 1.0:
            self.wait()

    def wait(self) -> None:
        """Block until a background save is written and finalised."""
        if self.pending is not None:
            step, future = self.pending
            future.result()
            self.pending = None
            self._finalise(step)

    def _finalise(self, step: int) -> None:
        dist.barrier()  # every rank's shards are on disk
        if self.rank == 0:
            tmp = self.root / f".{step_dir_name(step)}.tmp"
            shutil.copyfile(self.run_dir / "config.toml", tmp / "config.toml")
            seal(tmp, step, self.world_size)
            final = self.root / step_dir_name(step)
            if final.exists():  # a re-run of the same step after a restart
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomically(self.root / LATEST, final.name)
            self._prune()
        dist.barrier()

    def _prune(self) -> None:
        for path in complete_checkpoints(self.root)[self.cfg.keep_last:]:
            if path != self.resumed_from:  # never the one this run started from
                shutil.rmtree(path)

    def find_resumable(self) -> Path | None:
        """The newest checkpoint that verifies; with resume = "auto", older ones after a corrupt newest."""
        newest = latest_checkpoint(self.root)
        candidates = complete_checkpoints(self.root)
        if newest is not None and newest not in candidates:
            candidates.insert(0, newest)
        for path in candidates:
            try:
                verify(path)
                return path
            except CheckpointError as e:
                if self.cfg.resume != "auto":
                    raise
                if self.rank == 0:
                    print(f"{e}; falling back to an older checkpoint", flush=True)
        return None

    def load(self, path: Path, model, optimizer, scheduler) -> dict:
        """Restore everything saved at `path` (any world size or EP degree); returns the train state."""
        verify(path)
        state = self._state(model, optimizer, scheduler, {})
        state["train"] = {"step": 0, "tokens": 0, "data": {"epoch": 0, "position": 0}}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng = path / f"rng-rank{self.rank}.pt"
        saved_world = json.loads((path / COMPLETE).read_text())["world_size"]
        if saved_world == self.world_size and rng.is_file():  # resharded runs keep their fresh seeds
            _set_rng_state(torch.load(rng, weights_only=False))
        self.resumed_from = path
        return state["train"]
