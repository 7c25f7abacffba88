"""python -m benchmarks.prep_throughput: prep's tokens/s and peak memory on parquet inputs of growing size.

The inputs are laid out as a Hugging Face dataset is: `data/train-0000k-of-0000N.parquet`, a `text` column, row
groups of ROWS_PER_GROUP documents, about FILE_BYTES of text per file (snappy, pyarrow's default). The documents are
this machine's Python standard library sources (as moe_dist.data.corpus.stdlib_texts reads them), reshuffled on each
pass until the size is reached; sizes are of UTF-8 text, not of the compressed files. Inputs are generated once
under --workdir and reused; each prep's output is deleted after it is measured.

Each size is prepared by `python -m moe_dist.data.prep` in a fresh process with a fixed tokenizer (trained once on
TOKENIZER_SAMPLE_BYTES of the same text and kept in --workdir), so only the tokenization pass and what follows it
(the train/val split, the manifest) are timed; the time includes the process's start (imports, the spawn pool).
While it runs, a thread reads /proc/<pid>/status of the process and of every descendant (the pool's workers, the
resource tracker) every SAMPLE_SECONDS: the peak of the tree's summed VmRSS and RssAnon (file-backed pages, such as
shared libraries, count once per process in the RSS sum; the anonymous sum counts each process's own memory), and
the prep parent's own RSS, split at its last "tokenizing" progress line into the streaming pass and what follows.
The largest single process's peak is exact: ru_maxrss of os.wait4 on the prep process (the kernel's high-water mark
of it and of its reaped workers), taken by a small launcher process that starts it (see LAUNCHER). Memory that is
bounded gives a peak ratio near 1.0 between the largest and the smallest input. One run per size (--repeats is not
used).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks.common import environment, markdown_table, parser, setup, write_results
from moe_dist.data.corpus import stdlib_dir, stdlib_texts
from moe_dist.data.tokenizer import train_tokenizer

GB, MIB = 10**9, 2**20
QUICK_SIZES = (0.2, 0.4)  # GB of text: `make bench`; below ~0.2 GB the parent has not reached its steady peak
FULL_SIZES = (0.5, 2.0)  # --full
FILE_BYTES = 256 * 10**6  # of text per parquet file
ROWS_PER_GROUP = 1000
VOCAB_SIZE = 4096
TOKENIZER_SAMPLE_BYTES = 4 * 2**20
SAMPLE_SECONDS = 0.05
INPUT_VERSION = 1  # bump when the generated inputs change, so that old ones are not reused
TOKENIZING = re.compile(r"prep: tokenizing: .* in ([\d.]+) s")


def size_name(gb: float) -> str:
    return f"{gb:g}GB"


def input_dir(workdir: Path, gb: float) -> Path:
    return workdir / f"prep-input-v{INPUT_VERSION}-{size_name(gb)}"


def generate(target: Path, text_bytes: int, texts: list[str]) -> dict:
    """The dataset of `text_bytes` of text in target/data, written beside it and renamed into place whole."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "data").mkdir(parents=True)
    sizes = [len(t.encode()) for t in texts]
    rng = random.Random(0)
    files = max(1, math.ceil(text_bytes / FILE_BYTES))
    per_file = text_bytes / files
    order: list[int] = []
    docs = written = 0
    for k in range(files):
        path = partial / "data" / f"train-{k:05d}-of-{files:05d}.parquet"
        with pq.ParquetWriter(path, pa.schema([("text", pa.string())])) as writer:
            in_file = 0
            while in_file < per_file:
                group = []
                while len(group) < ROWS_PER_GROUP and in_file < per_file:
                    if not order:
                        order = rng.sample(range(len(texts)), len(texts))
                    i = order.pop()
                    group.append(texts[i])
                    in_file += sizes[i]
                writer.write_table(pa.table({"text": pa.array(group, pa.string())}), row_group_size=ROWS_PER_GROUP)
                docs += len(group)
        written += in_file
    info = {"text_bytes": written, "documents": docs, "files": files,
            "disk_bytes": sum(p.stat().st_size for p in (partial / "data").iterdir())}
    (partial / "input.json").write_text(json.dumps(info))
    shutil.rmtree(target, ignore_errors=True)
    os.rename(partial, target)
    return info


def tokenizer_file(workdir: Path, texts: list[str]) -> Path:
    """The fixed tokenizer every prep is given, trained once."""
    path = workdir / f"prep-tokenizer-v{INPUT_VERSION}-{VOCAB_SIZE}.json"
    if not path.is_file():
        sample, total = [], 0
        for text in texts:
            if total >= TOKENIZER_SAMPLE_BYTES:
                break
            sample.append(text)
            total += len(text.encode())
        tmp = path.with_name(path.name + ".partial")
        train_tokenizer(sample, VOCAB_SIZE).save(str(tmp))
        os.rename(tmp, path)
    return path


def _status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and VmHWM of one process, in bytes ({} once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def _tree(pid: int) -> list[int]:
    """pid and all its descendants, through /proc/<pid>/task/<tid>/children."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return found


class TreeSampler(threading.Thread):
    """Samples the memory of the process tree under `root` (the launcher, itself left out) every SAMPLE_SECONDS
    until stop(); the launcher's one child is the prep parent."""

    def __init__(self, root: int, start_time: float):
        super().__init__(daemon=True)
        self.root, self.done, self.start_time = root, threading.Event(), start_time
        self.samples: list[tuple[float, int, int, int, int]] = []  # (t, tree RSS, tree anon, parent RSS, processes)
        self.hwm: dict[int, int] = {}  # the last VmHWM seen of each process
        self.parent: int | None = None

    def run(self) -> None:
        while True:
            rss = anon = parent = n = 0
            tree = _tree(self.root)
            if self.parent is None and len(tree) > 1:
                self.parent = tree[1]  # the root's only child
            for p in tree[1:]:
                s = _status(p)
                if not s:
                    continue
                n += 1
                rss, anon = rss + s["VmRSS"], anon + s.get("RssAnon", 0)
                self.hwm[p] = max(self.hwm.get(p, 0), s["VmHWM"])
                if p == self.parent:
                    parent = s["VmRSS"]
            if n:
                self.samples.append((time.monotonic() - self.start_time, rss, anon, parent, n))
            if self.done.wait(SAMPLE_SECONDS):
                return

    def stop(self) -> None:
        self.done.set()
        self.join()


# Runs the command in argv and prints ru_maxrss (KiB) of it and its reaped descendants. A process exec'd by this
# benchmark starts with this benchmark's high-water mark as its ru_maxrss (exec keeps the replaced image's), so the
# prep is started from a small launcher, whose own high-water mark is what its child inherits.
LAUNCHER = """import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(usage.ru_maxrss, flush=True)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_prep(data: Path, out: Path, tokenizer: Path, workers: int | None) -> dict:
    """One prep of data into out in a fresh process: timings, stderr lines and memory."""
    cmd = [sys.executable, "-m", "moe_dist.data.prep", "--input", str(data), "--out", str(out),
           "--vocab-size", str(VOCAB_SIZE), "--tokenizer", str(tokenizer), "--force"]
    if workers:
        cmd += ["--workers", str(workers)]
    load = os.getloadavg()[0]  # a shared machine: other work on the cores shows here
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parent.parent)
    sampler = TreeSampler(proc.pid, start)
    sampler.start()
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic() - start, line.rstrip())
                                                          for line in proc.stderr), daemon=True)
    reader.start()
    maxrss = proc.stdout.read().split()
    proc.wait()
    seconds = time.monotonic() - start
    sampler.stop()
    reader.join()
    if proc.returncode != 0 or len(maxrss) != 1:
        raise SystemExit("prep_throughput: prep failed (exit code {}):\n{}".format(
            proc.returncode, "\n".join(line for _, line in lines[-20:])))
    tokenizing = [(t, m) for t, line in lines if (m := TOKENIZING.search(line))]
    end = tokenizing[-1][0] if tokenizing else seconds
    samples = sampler.samples
    return {"loadavg_1min_before": load, "seconds": seconds,
            "tokenizing_seconds": float(tokenizing[-1][1].group(1)) if tokenizing else None,
            "largest_process_peak": int(maxrss[0]) * 1024,
            "tree_rss_peak": max(s[1] for s in samples), "tree_anon_peak": max(s[2] for s in samples),
            "parent_peak_streaming": max((s[3] for s in samples if s[0] <= end), default=0),
            "parent_peak_after": max((s[3] for s in samples if s[0] > end), default=0),
            "parent_hwm_seen": sampler.hwm.get(sampler.parent, 0),
            "worker_hwm_seen": max((h for p, h in sampler.hwm.items() if p != sampler.parent), default=0),
            "max_processes": max(s[4] for s in samples), "samples": len(samples),
            "loadavg_1min_after": os.getloadavg()[0],
            "timeline": [list(s) for s in samples[::max(1, len(samples) // 400)]],
            "stderr": [f"{t:7.1f} s  {line}" for t, line in lines]}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", type=float, nargs="+",
                   help=f"GB of text per input (default {' '.join(map(str, QUICK_SIZES))}; "
                        f"{' '.join(map(str, FULL_SIZES))} with --full)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp"), help="where the inputs are kept and prep writes")
    p.add_argument("--workers", type=int, default=0, help="prep's --workers (0: prep's default)")
    p.add_argument("--clean", action="store_true", help="delete the generated inputs afterwards")
    args = p.parse_args(argv)
    setup(args)
    sizes = sorted(args.sizes or (FULL_SIZES if args.full else QUICK_SIZES))
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # Two runs in one workdir would share inputs and outputs, and each other's cores: the second waits.
    with open(workdir / ".prep_throughput.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"prep_throughput: another run holds {workdir}; waiting for it", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _run(args, sizes, workdir)


def _run(args: argparse.Namespace, sizes: list[float], workdir: Path) -> int:
    start = time.perf_counter()
    # Disk: each missing input (at most its text size on disk), and the largest prep's output and staging
    # (3 bytes a token, about 0.9 x the text here), with 1 GB to spare.
    missing = [gb for gb in sizes if not (input_dir(workdir, gb) / "input.json").is_file()]
    need = (sum(missing) + 1.2 * max(sizes) + 1) * GB
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise SystemExit(f"prep_throughput: {workdir} has {free / GB:.1f} GB free, {need / GB:.1f} GB needed")
    texts = list(stdlib_texts(stdlib_dir(), 2**40))
    tokenizer = tokenizer_file(workdir, texts)
    rows, results = [], []
    for gb in sizes:
        target = input_dir(workdir, gb)
        if (target / "input.json").is_file():
            info = json.loads((target / "input.json").read_text())
            generated = 0.0
        else:
            t0 = time.perf_counter()
            info = generate(target, int(gb * GB), texts)
            generated = time.perf_counter() - t0
        out = workdir / f"prep-out-{size_name(gb)}"
        shutil.rmtree(out, ignore_errors=True)
        try:
            m = run_prep(target / "data", out, tokenizer, args.workers)
            manifest = json.loads((out / "manifest.json").read_text())
        finally:
            shutil.rmtree(out, ignore_errors=True)
            if args.clean:
                shutil.rmtree(target, ignore_errors=True)
        splits = manifest["splits"]
        tokens = splits["train"]["tokens"] + splits["val"]["tokens"]
        documents = splits["train"]["documents"] + splits["val"]["documents"]
        results.append({"size_gb": gb, **info, "generate_seconds": generated, "tokens": tokens,
                        "documents_prepared": documents, "workers": args.workers or None, **m})
        tok_s = m["tokenizing_seconds"]
        rows.append([f"{info['text_bytes'] / GB:.2f} ({info['files']} files, {info['disk_bytes'] / 1e6:.0f} MB)",
                     f"{info['documents']:,}", f"{tokens / 1e6:.1f}M",
                     f"{m['seconds']:.0f}" + (f" ({tok_s:.0f})" if tok_s else ""),
                     f"{tokens / m['seconds'] / 1e3:.0f}k", f"{info['text_bytes'] / m['seconds'] / 1e6:.2f}",
                     f"{m['tree_rss_peak'] / MIB:.0f} ({m['tree_anon_peak'] / MIB:.0f})",
                     f"{m['largest_process_peak'] / MIB:.0f}",
                     f"{m['parent_peak_streaming'] / MIB:.0f} / {m['parent_peak_after'] / MIB:.0f}"])
    small, large = results[0], results[-1]
    ratios = {key: large[key] / small[key] for key in ("tree_rss_peak", "tree_anon_peak", "largest_process_peak")}
    workers = f"--workers {args.workers}" if args.workers else "prep's default workers"
    print(f"## Prep throughput and peak memory: parquet inputs (HF layout), vocab {VOCAB_SIZE}, {workers}, "
          f"{environment(torch.device('cpu'))['device']}\n")
    print("Sizes in GB of UTF-8 text (the parquet files' size on disk in brackets); wall time of the whole "
          "`python -m moe_dist.data.prep` (its tokenizing pass in brackets); tokens/s and MB/s over the wall time; "
          "memory in MiB; the prep parent's peak while streaming and after its last tokenizing line (the split).\n")
    print(markdown_table(["input GB", "documents", "tokens", "seconds", "tokens/s", "MB/s",
                          "peak RSS, tree sum (anon)", "largest process", "prep parent: streaming / after"], rows))
    if len(results) > 1:
        print(f"\nPeak at {size_name(large['size_gb'])} / at {size_name(small['size_gb'])}: tree RSS "
              f"{ratios['tree_rss_peak']:.2f}, tree anon {ratios['tree_anon_peak']:.2f}, largest process "
              f"{ratios['largest_process_peak']:.2f} (1.0: bounded)")
    print(f"\nprep_throughput: {time.perf_counter() - start:.0f} s")
    write_results("prep_throughput", {**environment(torch.device("cpu")), "vocab_size": VOCAB_SIZE,
                                      "file_bytes": FILE_BYTES, "rows_per_group": ROWS_PER_GROUP,
                                      "cpu_count": os.cpu_count(), "peak_ratios": ratios, "runs": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
