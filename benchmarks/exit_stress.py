"""python -m benchmarks.exit_stress [--runs 30] [--async-save]: how many healthy 2-rank runs do not exit 0.

A job scheduler retries or alerts on every non-zero exit, so a finished run must exit 0 every time. Each
run is the trainer under torchrun on 2 gloo ranks, a few steps of a small model on a small prepared
corpus, checkpointing every 2 steps (with --async-save: in the background while training goes on).
Prints the count of runs that did not exit 0 (the target is 0), with each failure's exit code and first
error line.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_results
from moe_dist.data.corpus import stdlib_dir, stdlib_texts
from moe_dist.data.prep import prepare

MODEL = ["--model.dim", "64", "--model.n_layers", "2", "--model.ffn_hidden", "128", "--moe.expert_hidden", "64",
         "--model.max_seq_len", "64", "--data.seq_len", "64", "--model.vocab_size", "512"]


def _corpus(root: Path) -> Path:
    (root / "in").mkdir()
    for i, text in enumerate(stdlib_texts(stdlib_dir(), 600_000)):
        (root / "in" / f"{i:04d}.txt").write_text(text)
    return prepare([root / "in"], root / "data", 512, workers=1, val_fraction=0.2)


def _first_error(output: str) -> str:
    for line in output.splitlines():
        if "terminate called" in line or "Error" in line or "error" in line:
            return line.strip()[:200]
    return "(no error line)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--timeout", type=float, default=300, help="seconds before a run counts as hung")
    args = p.parse_args(argv)
    failures, seconds = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = _corpus(Path(tmp))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "moe_dist.train", "--metrics.runs_dir", str(Path(tmp) / "runs"), "--data.path", str(data),
               *MODEL, "--train.steps", "6", "--checkpoint.interval", "2", "--train.eval_steps", "1",
               "--checkpoint.async_save", "true" if args.async_save else "false", "--overwrite"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for i in range(args.runs):
            start = time.perf_counter()
            try:
                result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
                code, output = result.returncode, result.stdout + result.stderr
            except subprocess.TimeoutExpired as e:
                code, output = "hung", (e.stdout or b"").decode() + (e.stderr or b"").decode()
            seconds.append(time.perf_counter() - start)
            if code != 0:
                failures.append({"run": i + 1, "exit": code, "error": _first_error(output)})
                print(f"run {i + 1}: exit {code}: {failures[-1]['error']}", flush=True)
    print(f"exit stress: {len(failures)} of {args.runs} runs did not exit 0 ({args.nproc} ranks, async save "
          f"{'on' if args.async_save else 'off'}, {sum(seconds) / len(seconds):.1f} s a run)")
    write_results(f"exit_stress{'_async' if args.async_save else ''}",
                  {"runs": args.runs, "nproc": args.nproc, "async_save": args.async_save, "failures": failures,
                   "seconds": seconds, "command": " ".join(cmd)})
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
