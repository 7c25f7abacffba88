"""torch.distributed.checkpoint save / load / resume: atomic, checksummed, keep-last-k, optionally async.

runs/<name>/checkpoints/step-<N>/ holds the DCP shards of every rank, each rank's RNG state, the
resolved config.toml and COMPLETE: every file with its size and CRC-32, written last. A checkpoint
is written as .step-<N>.tmp and renamed when every rank has finished; `latest` (a text file
naming the newest complete checkpoint) is replaced atomically after that. A kill at any moment
leaves at worst a .tmp directory, which is never resumed from and is removed by the next save.
Each file's CRC-32 is computed as DCP writes it, and checked (spread over the ranks) before a resume.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import sys
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

import kernels.grouped_mm
from moe_dist.config import CheckpointConfig
from moe_dist.parallel.agreement import first_problem
from moe_dist.files import WriteError, file_crc32, refused_write, swap_in, write_atomically

COMPLETE = "COMPLETE"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A missing, incomplete or corrupt checkpoint; the message names the offending path."""


def step_dir_name(step: int) -> str:
    return f"step-{step}"


class _Crc32Stream:
    """A file being written whose CRC-32 and size follow every write (DCP writes its files front to back).

    A large write's CRC runs on a helper thread while this one copies the same bytes into the file (both
    release the GIL), so the checksum costs little beyond the write itself; the write returns only when
    both are done, because the bytes may belong to a buffer the caller reuses.
    """

    PARALLEL_BYTES = 1 << 20

    def __init__(self, stream: io.IOBase, pool: ThreadPoolExecutor):
        self.stream, self.pool, self.crc, self.size = stream, pool, 0, 0

    def write(self, data) -> int:
        view = memoryview(data)
        if view.nbytes < self.PARALLEL_BYTES:
            self.crc = zlib.crc32(view, self.crc)
            written = self.stream.write(data)
        else:
            crc = self.pool.submit(zlib.crc32, view, self.crc)
            written = self.stream.write(data)
            self.crc = crc.result()
        self.size += view.nbytes
        return written

    def seek(self, *args) -> int:  # a seek back would make the running CRC wrong: refuse rather than mislead
        raise io.UnsupportedOperation("checksummed checkpoint files are written sequentially")

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


class _Crc32FileSystem(FileSystem):
    """DCP's local file system, recording each written file's size and CRC-32 by name."""

    def __init__(self):
        super().__init__()
        self.written: dict[str, dict] = {}

    @contextmanager
    def create_stream(self, path, mode: str) -> Iterator[io.IOBase]:
        try:
            with super().create_stream(path, mode) as stream:
                if "w" not in mode:
                    yield stream
                    return
                with ThreadPoolExecutor(1, thread_name_prefix="crc32") as pool:
                    tracked = _Crc32Stream(stream, pool)
                    yield tracked
        except OSError as e:  # a failed write or close names no file: say which one
            if e.filename or e.errno is None:
                raise
            raise OSError(e.errno, e.strerror, str(path)) from e
        self.written[Path(path).name] = {"bytes": tracked.size, "crc32": f"{tracked.crc:08x}"}

    def rename(self, path, new_path) -> None:  # DCP writes .metadata under a temporary name first
        super().rename(path, new_path)
        if Path(path).name in self.written:
            self.written[Path(new_path).name] = self.written.pop(Path(path).name)


class _Crc32Writer(FileSystemWriter):
    def __init__(self, path: Path):
        super().__init__(path)
        self.fs = _Crc32FileSystem()


def file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "crc32": file_crc32(path)}


def seal(path: Path, step: int, world_size: int, files: dict[str, dict] | None = None) -> None:
    """Write COMPLETE: every file of the checkpoint with its size and CRC-32 (computed here where not given)."""
    files = dict(files or {})
    for p in sorted(path.iterdir()):
        if p.is_file() and p.name not in files and p.name != COMPLETE:
            files[p.name] = file_record(p)
    write_atomically(path / COMPLETE, json.dumps({"step": step, "world_size": world_size, "files": files}, indent=1))


def read_complete(path: Path) -> dict:
    """COMPLETE of the checkpoint at `path`; CheckpointError naming it when it is missing or unreadable."""
    manifest = path / COMPLETE
    if not manifest.is_file():
        raise CheckpointError(f"checkpoint {path}: incomplete (no {COMPLETE} file)")
    try:
        complete = json.loads(manifest.read_text())
        files = complete["files"]
        if not isinstance(files, dict) or not isinstance(complete["world_size"], int):
            raise ValueError("unexpected structure")
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise CheckpointError(f"checkpoint {path}: {COMPLETE} is unreadable ({type(e).__name__}: {e})") from None
    return complete


def verify(path: Path, rank: int = 0, world_size: int = 1) -> None:
    """CheckpointError naming the first file that is missing, of another size or (for this rank's share of the
    files, every world_size-th one) of another CRC-32."""
    for i, (name, expected) in enumerate(sorted(read_complete(path)["files"].items())):
        file = path / name
        if "/" in name or not file.is_file():
            raise CheckpointError(f"checkpoint {path}: file {file} is missing")
        # Checkpoints written before checksums list sizes only.
        expected = expected if isinstance(expected, dict) else {"bytes": expected}
        if file.stat().st_size != expected.get("bytes"):
            raise CheckpointError(f"checkpoint {path}: file {file} is {file.stat().st_size} bytes, "
                                  f"expected {expected.get('bytes')}")
        if "crc32" in expected and i % world_size == rank and file_crc32(file) != expected["crc32"]:
            raise CheckpointError(f"checkpoint {path}: file {file} is corrupt (its CRC-32 is not the one "
                                  f"recorded when it was written)")


def complete_checkpoints(checkpoint_root: Path) -> list[Path]:
    """Finished checkpoint directories (renamed from .tmp), newest first; not yet verified."""
    if not checkpoint_root.is_dir():
        return []
    found = [p for p in checkpoint_root.glob("step-*") if p.is_dir() and not p.is_symlink() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def latest_checkpoint(checkpoint_root: Path) -> Path | None:
    """The checkpoint `latest` names, or None when there is none."""
    latest = checkpoint_root / LATEST
    if not latest.is_file():
        return None
    return checkpoint_root / latest.read_text().strip()


def _process_state() -> dict:
    """What this process needs, beyond the weights, to continue bit for bit: its RNGs, and the grouped-GEMM
    backends `auto` measured (a fresh process could measure a near-tie the other way)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "grouped_mm_backends": dict(kernels.grouped_mm.MEASURED_BACKENDS)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_process_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    kernels.grouped_mm.MEASURED_BACKENDS.update(state.get("grouped_mm_backends", {}))


def _data_state_template(path: Path) -> dict:
    """The data loader's state as the checkpoint holds it (DCP loads only the keys it is given): one dataset's
    position, or a mixture's (moe_dist.data.mixture)."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {"mixture": ""} if "train.data.mixture" in saved else {"epoch": 0, "position": 0}


class Checkpointer:
    """Saves and restores model, optimizer, scheduler and the trainer's own state on every rank."""

    def __init__(self, run_dir: Path, cfg: CheckpointConfig, rank: int, world_size: int):
        self.root = run_dir / "checkpoints"
        self.run_dir = run_dir
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.resumed_from: Path | None = None
        self.verified: Path | None = None  # checked by verify_everywhere, so load need not read it twice
        self.pending: tuple[int, Future, _Crc32Writer] | None = None  # an async save not yet finalised
        self._async_group: dist.ProcessGroup | None = None

    def _state(self, model, optimizer, scheduler, train_state: dict) -> dict:
        return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer),
                "scheduler": scheduler.state_dict(), "train": train_state}

    def _tmp(self, step: int) -> Path:
        return self.root / f".{step_dir_name(step)}.tmp"

    def _together(self, step: int, failure: BaseException | None, path: Path | None = None) -> None:
        """WriteError on every rank when the filesystem refused any rank's write of checkpoint `step` (full, over
        quota, read-only): its temporary directory is removed and `latest` still names the last good checkpoint.
        Every rank calls this at the same point, so none is left waiting in a collective for one that stopped."""
        if isinstance(failure, CheckpointException):  # DCP raises the same one on every rank
            failure = next((f[0] for f in failure.failures.values() if isinstance(f[0], OSError)), failure)
        if failure is not None and not isinstance(failure, OSError):
            raise failure
        line = first_problem(None if failure is None else refused_write("train", failure, path))
        if line is None:
            return
        latest = latest_checkpoint(self.root)
        if self.rank == 0:
            shutil.rmtree(self._tmp(step), ignore_errors=True)
            if latest != self.root / step_dir_name(step):  # swapped in, but `latest` could not be made to name it
                shutil.rmtree(self.root / step_dir_name(step), ignore_errors=True)
        raise WriteError(f"{line}; checkpoint {step_dir_name(step)} was not saved, the latest is "
                         f"{latest if latest is not None else 'none (no checkpoint was saved)'}")

    def save(self, step: int, model, optimizer, scheduler, train_state: dict) -> None:
        """Write checkpoint `step` (in the background when checkpoint.async_save)."""
        self.wait()
        tmp = self._tmp(step)
        failure = None
        if self.rank == 0:
            try:
                if tmp.exists():  # left by a run killed while saving
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            except OSError as e:
                failure = e
        self._together(step, failure)  # also: the directory exists before any rank writes into it
        rng = tmp / f"rng-rank{self.rank}.pt"
        state = io.BytesIO()
        torch.save(_process_state(), state)
        try:
            # One Python write: a disk that fills part-way is an OSError (torch.save into the file would raise
            # a RuntimeError from its zip writer).
            with open(rng, "wb") as f:
                f.write(state.getbuffer())
            failure = None
        except OSError as e:
            failure = e
        self._together(step, failure, rng)
        state = self._state(model, optimizer, scheduler, train_state)
        writer = _Crc32Writer(tmp)
        if self.cfg.async_save:
            # The background save runs collectives while training runs its own: on the same group the
            # two interleave (a size mismatch, a hang, or silently mixed data). It gets a group of its own.
            if self._async_group is None:
                self._async_group = dist.new_group(backend="gloo")
            future = dcp.async_save(state, storage_writer=writer, process_group=self._async_group)
            self.pending = (step, future, writer)
        else:
            try:
                dcp.save(state, storage_writer=writer)
            except CheckpointException as e:
                self._together(step, e)
            self._finalise(step, writer)

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
            step, future, writer = self.pending
            self.pending = None
            try:
                future.result()
            except CheckpointException as e:
                self._together(step, e)
            self._finalise(step, writer)

    def _finalise(self, step: int, writer: _Crc32Writer) -> None:
        tmp = self._tmp(step)
        rng = tmp / f"rng-rank{self.rank}.pt"
        files = {**writer.fs.written, rng.name: file_record(rng)}
        gathered = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(files, gathered, dst=0)  # also: every rank's shards are on disk
        failure = None
        if self.rank == 0:
            try:
                shutil.copyfile(self.run_dir / "config.toml", tmp / "config.toml")
                seal(tmp, step, self.world_size, {name: record for part in gathered for name, record in part.items()})
                swap_in(tmp, self.root / step_dir_name(step))  # a re-run of the step after a restart replaces it
                write_atomically(self.root / LATEST, step_dir_name(step))
            except OSError as e:
                failure = e
        self._together(step, failure)
        if self.rank == 0:
            self._prune()

    def _prune(self) -> None:
        for path in complete_checkpoints(self.root)[self.cfg.keep_last:]:
            if path != self.resumed_from:  # never the one this run started from
                try:
                    shutil.rmtree(path)
                except OSError as e:  # e.g. a file still open on NFS: the next save tries again
                    print(f"warning: {refused_write('train', e, path)} (pruning {path.name}); "
                          f"training goes on", file=sys.stderr, flush=True)

    def verify_everywhere(self, path: Path) -> str | None:
        """Why the checkpoint at `path` cannot be used, or None; each rank reads its share of the files and
        every rank gets the same answer."""
        try:
            verify(path, self.rank, self.world_size)
            problem = None
        except CheckpointError as e:
            problem = str(e)
        problem = first_problem(problem)
        if problem is None:
            self.verified = path
        return problem

    def find_resumable(self) -> Path | None:
        """The newest checkpoint that verifies; with resume = "auto", older ones after a corrupt newest."""
        newest = latest_checkpoint(self.root)
        candidates = complete_checkpoints(self.root)
        if newest is not None and newest not in candidates:
            candidates.insert(0, newest)
        for path in candidates:
            problem = self.verify_everywhere(path)
            if problem is None:
                return path
            if self.cfg.resume != "auto":
                raise CheckpointError(problem)
            if self.rank == 0:
                print(f"{problem}; falling back to an older checkpoint", flush=True)
        return None

    def load(self, path: Path, model, optimizer, scheduler) -> dict:
        """Restore everything saved at `path` (any world size or EP degree); returns the train state."""
        if self.verified != path:
            problem = self.verify_everywhere(path)
            if problem is not None:
                raise CheckpointError(problem)
        state = self._state(model, optimizer, scheduler, {})
        state["train"] = {"step": 0, "tokens": 0, "data": _data_state_template(path)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng = path / f"rng-rank{self.rank}.pt"
        if read_complete(path)["world_size"] == self.world_size and rng.is_file():  # resharded runs keep fresh seeds
            _set_process_state(torch.load(rng, weights_only=False))
        self.resumed_from = path
        return state["train"]
