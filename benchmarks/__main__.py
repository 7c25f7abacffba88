"""python -m benchmarks [--full] [--threads N] [--device D]: the benchmarks in turn, as `make bench`."""

from __future__ import annotations

import sys
import time

from benchmarks import (all_to_all, checkpoint_save, import_memory, prep_throughput, routing, startup_memory,
                        train_step)


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    for bench in (routing, all_to_all, train_step, checkpoint_save, startup_memory, import_memory, prep_throughput):
        bench.main(argv)
        print(flush=True)
    print(f"bench: {time.perf_counter() - start:.0f} s for all seven")
    return 0


if __name__ == "__main__":
    sys.exit(main())
