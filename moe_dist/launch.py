"""python -m moe_dist.launch [--nproc N] [--max-restarts R] [trainer options]: check once, then torchrun.

What `make train` and launch/local.sh run on one node. The start-up checks (config, mesh, data, run
dir, checkpoint) run first, here, in one process: bad input is our one line and exit code 2, not a
line from a rank followed by torchrun's failure report. Then torchrun (`--standalone -m moe_dist.train`, as
moe_dist.agent: it ends with this launcher, and adds no report to the ranks' own one-line errors) starts the
ranks. SIGTERM to this launcher goes to the ranks, which save a checkpoint and exit 0, so
the launcher exits 0 too; sent to torchrun itself, it would end the job as a failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from moe_dist import train
from moe_dist.cli import OneLineParser
from moe_dist.lifetime import end_children_with_this_process


def default_nproc() -> int:
    """One process per GPU, else one per CPU core."""
    return torch.cuda.device_count() or os.cpu_count() or 1


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc: Linux)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # the name, in parentheses, may hold spaces
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _forward_sigterm(torchrun: subprocess.Popen) -> None:
    ranks = _children(torchrun.pid)
    for pid in ranks or [torchrun.pid]:  # without /proc, torchrun forwards it (and reports a failure)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def preflight(nproc: int, trainer_args: list[str]) -> int:
    """The trainer's own start-up checks for a world of `nproc` ranks, in this process; 0 when all pass."""
    os.environ["WORLD_SIZE"] = str(nproc)
    try:
        return train.main(["--preflight", *trainer_args])
    finally:
        del os.environ["WORLD_SIZE"]


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m moe_dist.launch", allow_abbrev=False,
                           description="check once, then torchrun -m moe_dist.train on this node")
    parser.add_argument("--nproc", type=int, default=0, help="processes (0: one per GPU, else one per CPU core)")
    parser.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts every rank after a failure")
    args, trainer_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.nproc < 0 or args.max_restarts < 0:
        parser.error(f"--nproc {args.nproc} and --max-restarts {args.max_restarts} must be >= 0")
    nproc = args.nproc or default_nproc()
    status = preflight(nproc, trainer_args)
    if status != 0:
        return status
    # torchrun as moe_dist.agent: a kill -9 of this launcher ends it, and its ranks end with it.
    # Each attempt's ranks get a store of their own (see init_distributed in parallel/mesh.py). One OpenMP thread
    # per rank of several unless set: what torchrun sets anyway, without its four-line banner saying so.
    env = end_children_with_this_process({**({"OMP_NUM_THREADS": "1"} if nproc > 1 else {}), **os.environ,
                                          "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    torchrun = subprocess.Popen([sys.executable, "-m", "moe_dist.agent", "--standalone",
                                 f"--nproc_per_node={nproc}", f"--max-restarts={args.max_restarts}",
                                 "-m", "moe_dist.train", *trainer_args], env=env)
    signal.signal(signal.SIGTERM, lambda signum, frame: _forward_sigterm(torchrun))
    while True:
        try:
            return torchrun.wait()
        except KeyboardInterrupt:  # Ctrl-C reached torchrun and the ranks too: wait for them to stop
            continue


if __name__ == "__main__":
    sys.exit(main())
