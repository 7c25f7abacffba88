"""Run a function on N gloo ranks in spawned processes and collect what each returns."""

from __future__ import annotations

import multiprocessing
import tempfile
import traceback
from pathlib import Path
from collections.abc import Callable

import torch
import torch.distributed as dist

from benchmarks.common import init_rank
from moe_dist.parallel.mesh import exit_process


def _worker(fn: Callable, rank: int, world_size: int, workdir: str, args: tuple) -> None:
    torch.set_num_threads(1)
    code = 1
    try:
        init_rank(rank, world_size, f"{workdir}/store", "cpu")  # the trainer's own start
        result = fn(rank, world_size, *args)
        torch.save(result, f"{workdir}/result-{rank}.pt")
        code = 0
    except BaseException:
        Path(f"{workdir}/error-{rank}.txt").write_text(traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        exit_process(code)  # as the trainer's ranks leave


# A rank started with "spawn" imports torch and moe_dist afresh: 8 s for 4 ranks on 2 cores, some 45 times a
# suite. A fork server imports them once per test process and forks each rank from it in 0.1 s; unlike a plain
# fork of the test process, it holds no threads or process groups of a test's making.
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["torch", "moe_dist.train", "distributed"])


def run_on_ranks(fn: Callable, world_size: int, *args, timeout: float = 600) -> list:
    """fn(rank, world_size, *args) on each rank (a module-level function); returns the results by rank."""
    ctx = _CONTEXT
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


def in_fresh_process(fn: Callable, *args):
    """fn(*args) (a module-level function) in a process forked from the fork server, in no process group; its
    result."""
    with _CONTEXT.Pool(1) as pool:
        return pool.apply(fn, args)
