"""Run a function on N gloo ranks in spawned processes and collect what each returns."""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import traceback
from pathlib import Path
from collections.abc import Callable

import torch
import torch.distributed as dist


def _worker(fn: Callable, rank: int, world_size: int, workdir: str, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        dist.init_process_group("gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save(result, f"{workdir}/result-{rank}.pt")
    except BaseException:
        Path(f"{workdir}/error-{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(fn: Callable, world_size: int, *args, timeout: float = 600) -> list:
    """fn(rank, world_size, *args) on each rank (a module-level function); returns the results by rank."""
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as workdir:
        procs = [ctx.Process(target=_worker, args=(fn, rank, world_size, workdir, args)) for rank in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        errors = sorted(Path(workdir).glob("error-*.txt"))
        for p in procs:
            if p.is_alive():
                p.kill()
        if errors:
            raise AssertionError(f"{errors[0].name}:\n{errors[0].read_text()}")
        if any(p.exitcode != 0 for p in procs):
            raise AssertionError(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
        return [torch.load(f"{workdir}/result-{rank}.pt", weights_only=False) for rank in range(world_size)]
