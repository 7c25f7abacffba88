"""python -m benchmarks [--full] [--threads N] [--device D]: the benchmarks in turn, as `make bench`."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from types import ModuleType

import torch.distributed as dist

from benchmarks import (all_to_all, checkpoint_save, import_memory, mixture_loader, prep_throughput, routing,
                        startup_memory, train_step)
from moe_dist.parallel.mesh import exit_process

BENCHMARKS: tuple[ModuleType, ...] = (routing, all_to_all, train_step, checkpoint_save, startup_memory, import_memory,
                                      prep_throughput, mixture_loader)


def run_all(benchmarks: list[tuple[str, Callable[[list[str] | None], int]]], argv: list[str] | None) -> list[str]:
    """Run every (name, main) in turn, each whatever the ones before it did; returns a line per failure."""
    failures = []
    for name, main in benchmarks:
        try:
            code = main(argv)
        except SystemExit as e:  # argparse, and a benchmark's one-line stop
            code = e.code
        except Exception as e:
            traceback.print_exc()
            code = f"raised {type(e).__name__}: {e}"
        if code not in (0, None):
            failures.append(f"{name}: {code if isinstance(code, str) else f'exit {code}'}")
            # One that failed half-way may have left its process group: the next one starts its own.
            if dist.is_initialized():
                dist.destroy_process_group()
        print(flush=True)
    return failures


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    failures = run_all([(b.__name__.removeprefix("benchmarks."), b.main) for b in BENCHMARKS], argv)
    print(f"bench: {time.perf_counter() - start:.0f} s for all {len(BENCHMARKS)}, {len(failures)} failed")
    for failure in failures:
        print(f"  FAILED {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    exit_process(main())  # some benchmarks join a process group in this process
