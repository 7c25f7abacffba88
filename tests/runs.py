"""Start the trainer as a subprocess (plain or under torchrun) and read what it wrote."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from moe_dist.config import load_config
from moe_dist.model import Transformer

REPO = Path(__file__).resolve().parent.parent


def trainer_command(nproc: int = 1, max_restarts: int = 0) -> list[str]:
    if nproc == 1 and not max_restarts:
        return [sys.executable, "-m", "moe_dist.train"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}", "-m", "moe_dist.train"]


# A model a few times smaller than tiny, for runs that test the trainer rather than the model.
SMALL_MODEL = ["--model.dim", "64", "--model.n_layers", "2", "--model.ffn_hidden", "128", "--moe.expert_hidden", "64",
               "--model.max_seq_len", "64", "--data.seq_len", "64"]


def trainer_args(runs_dir: Path, data_dir: Path | None, *args: str) -> list[str]:
    data = ["--data.path", str(data_dir), "--model.vocab_size", "512"] if data_dir else []
    return ["--metrics.runs_dir", str(runs_dir), "--metrics.log_interval", "1", "--train.eval_steps", "1", *data,
            *args]


def start_trainer(cmd: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def local_sh(*args: str, **popen) -> subprocess.Popen:
    """launch/local.sh with two CPU processes and this interpreter."""
    env = {**os.environ, "NPROC": "2", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(["launch/local.sh", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def run_trainer(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def train_in_process(argv: list[str]) -> subprocess.CompletedProcess:
    """moe_dist.train's main in this process, as run_trainer runs it in another (without the interpreter's start):
    its exit code, stdout and stderr."""
    from moe_dist import train

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train.main(argv)
    return subprocess.CompletedProcess(["moe_dist.train", *argv], code, out.getvalue(), err.getvalue())


def _train_rank(rank: int, world_size: int, argv: list[str]) -> subprocess.CompletedProcess:
    return train_in_process(argv)  # main joins the process group the rank is already in


def train_on_ranks(argv: list[str], world_size: int) -> subprocess.CompletedProcess:
    """moe_dist.train's main on `world_size` gloo ranks forked by distributed.run_on_ranks, as torchrun runs it
    (without torchrun and the ranks' interpreter start, some seconds each on 2 cores): rank 0's stdout and stderr,
    with the first nonzero exit code of any rank, as torchrun's."""
    from distributed import run_on_ranks

    ranks = run_on_ranks(_train_rank, world_size, argv)
    code = next((r.returncode for r in ranks if r.returncode), 0)
    return subprocess.CompletedProcess(ranks[0].args, code, ranks[0].stdout, ranks[0].stderr)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll until condition() holds; fail with the process's stderr if it exits first."""
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


def processes_with(text: str) -> list[int]:
    """The live processes whose command line contains `text` (from /proc: Linux)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:  # gone meanwhile
            continue
    return found


def tree_state(*roots: Path, ignore: tuple[str, ...] = ()) -> dict[str, object]:
    """Every directory, link and file under roots (links not followed), files with their size and content hash:
    equal means untouched. Paths whose part below their root contains any of `ignore` are never read: a live run
    may delete them meanwhile."""
    state = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if any(part in str(path.relative_to(root)) for part in ignore):
                continue
            if path.is_symlink():
                state[str(path)] = ("link", os.readlink(path))
            elif path.is_dir():
                state[str(path)] = "dir"
            else:
                state[str(path)] = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def corrupt_in_place(step_dir: Path) -> Path:
    """64 KiB of garbage written over the middle of a checkpoint shard: the same size, other bytes."""
    shard = next(step_dir.glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.seek(shard.stat().st_size // 2)
        f.write(bytes((7 * i + 3) % 256 for i in range(65536)))
    return shard


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of metrics.jsonl; a line the trainer is still writing (no newline yet) is left out."""
    complete = (run_dir / "metrics.jsonl").read_text().split("\n")[:-1]
    return [json.loads(line) for line in complete if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from metrics.jsonl (a restarted step keeps its last value)."""
    if not (run_dir / "metrics.jsonl").exists():
        return {}
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def checkpoint_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    """The model weights of a DCP checkpoint, read in this process without a process group."""
    cfg = load_config(str(step_dir / "config.toml"))
    state = {"model": Transformer(cfg.model, cfg.moe).state_dict()}
    dcp.load(state, checkpoint_id=step_dir, no_dist=True)
    return state["model"]
