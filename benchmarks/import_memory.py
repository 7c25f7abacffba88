"""python -m benchmarks.import_memory: each rank's peak memory while a Hugging Face checkpoint is imported.

A Mixtral of the small config's shape with random weights (transformers' own initialisation), written by
save_pretrained (per-expert keys, fp32, several safetensors files) in a subprocess, so that neither transformers
nor the model is in the parent the ranks are spawned from. It is imported at world 4 on gloo with ep 4, each way
in fresh processes: moe_dist's import (config_from_hf, open_init_weights, build_model reading only the blocks the
rank's shards own) and, for contrast, every rank loading every file whole with safetensors.torch.load_file and
copying its shards out of that. The bound the import promises is a rank's shards plus the largest single
parameter (the one full tensor it may hold at a time).

Which memory: safetensors memory-maps the files (its default backend), and the tensors it returns, whole or
sliced, are views of the map. The pages a rank reads count in its resident set, and so in VmHWM, as file-backed
memory (RssFile), and they stay mapped while the files are open. They are the page cache's own pages: one copy
shared by every rank that reads them, clean, and dropped by the kernel under memory pressure with nothing to write
back. What a rank holds of its own is its anonymous memory (RssAnon), so the bound is checked against the peak
growth of RssAnon. Linux keeps no high-water mark for it: a thread samples /proc/self/status every 0.5 ms (torch's
copies and stacks release the GIL), which can miss a spike shorter than that, so VmHWM growth minus the file-backed
growth at the end (file pages only accumulate while the files are open) is given as well: a lower bound on the
anonymous peak that nothing can miss. VmHWM growth itself (reset through /proc/self/clear_refs after a warm-up
import of the tiny config, as startup_memory does) is given too: anonymous and file-backed together.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from benchmarks.common import environment, markdown_table, parser, setup, spawn_ranks, status_kib, write_results
from benchmarks.startup_memory import MIB, model_bytes, peak, reset_peak
from moe_dist.config import load_config
from moe_dist.hf.config import FAMILIES, config_from_hf, hf_config
from moe_dist.hf.weights import HFCheckpoint, open_init_weights
from moe_dist.parallel.mesh import Runtime, build_mesh
from moe_dist.train import build_model

MAX_SHARD_SIZE = "100MB"  # save_pretrained's file size: the small config's 559 MB in 7 files
WARMUP = ("tiny", {"moe.first_k_dense": 0})  # tiny, all MoE as Mixtral is: the warm-up import's checkpoint
# The ways a rank imports -> load_file's backend, None for moe_dist's lazy import. With mmap (safetensors'
# default) load_file returns views of the map, read only where a rank copies from; with pread the whole
# checkpoint is read into each rank's own memory, as older safetensors did and as the naive import means.
WAYS = {"moe_dist import (only the rank's blocks read)": None,
        "load_file every file (mmap: views of the map)": "mmap",
        "load_file every file, read into memory (pread)": "pread"}


def save_mixtral(directory: str, config: str) -> None:
    """The checkpoints the ranks import, as transformers writes them: `config`'s shape and WARMUP's."""
    import transformers  # only in this subprocess

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    for name, cfg in ((config, load_config(config)), ("warmup", load_config(*WARMUP))):
        values = hf_config(cfg, FAMILIES["mixtral"], "float32", None, None)
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig.from_dict(values))
        model.save_pretrained(Path(directory) / name, max_shard_size=MAX_SHARD_SIZE)


class LoadedCheckpoint(HFCheckpoint):
    """The same files, each loaded whole with safetensors.torch.load_file on open: the naive import."""

    def __init__(self, directory: str | Path, backend: str):
        super().__init__(directory)
        self.tensors: dict[str, torch.Tensor] = {}
        for path in sorted(set(self.files.values())):
            self.tensors.update(load_file(path, backend=backend))

    def read(self, key: str, block: tuple[slice, ...]) -> torch.Tensor:
        return self.tensors[key][block]


def hf_import(directory: Path, world: int, runtime: Runtime, backend: str | None):
    """(model, weights) imported from `directory`: the weights are returned so that their files stay open, as in
    training (moe_dist.startup keeps them)."""
    cfg = config_from_hf(directory, {"parallel.ep": world, "train.init_from": str(directory), "data.seq_len": 64})
    weights = open_init_weights(cfg)
    if backend is not None:
        weights.checkpoint = LoadedCheckpoint(directory, backend)
    return build_model(cfg, build_mesh(cfg, world, "cpu"), runtime, weights.read), weights


class AnonPeak(threading.Thread):
    """The highest RssAnon seen, in bytes, sampled every `interval` seconds from start() to stop()."""

    def __init__(self, interval: float = 5e-4):
        super().__init__(daemon=True)
        self.interval, self.high, self.done = interval, status_kib("RssAnon"), threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.high = max(self.high, status_kib("RssAnon"))

    def stop(self) -> int:
        self.done.set()
        self.join()
        return max(self.high, status_kib("RssAnon")) * 1024


def measure(rank: int, world: int, device: torch.device, directory: str, config: str, way: str) -> list[float]:
    """[VmHWM growth, file-backed growth at the end, anonymous peak growth, shard bytes, largest parameter]."""
    runtime = Runtime(rank, world, rank, device)
    backend = WAYS[way]
    hf_import(Path(directory) / "warmup", world, runtime, backend)  # loads every code path, then freed
    before = reset_peak(device)
    anon_before, file_before = status_kib("RssAnon") * 1024, status_kib("RssFile") * 1024
    sampler = AnonPeak()
    sampler.start()
    model, _weights = hf_import(Path(directory) / config, world, runtime, backend)
    anon = sampler.stop() - anon_before
    grown = peak(device) - before
    file = status_kib("RssFile") * 1024 - file_before
    return [grown, file, anon, *model_bytes(model)]


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--config", default="small", help="the moe_dist config whose shape the Mixtral checkpoint has")
    p.add_argument("--world", type=int, default=4)
    args = p.parse_args(argv)
    setup(args)  # the thread count; the ranks are CPU processes on gloo whatever --device says
    if importlib.util.find_spec("transformers") is None:
        print("import_memory: transformers is not installed (pip install -e '.[dev]'); skipped")
        return 0
    device = torch.device("cpu")
    start = time.perf_counter()
    ways = WAYS if "backend" in inspect.signature(load_file).parameters else {next(iter(WAYS)): None}
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        saver = mp.get_context("spawn").Process(target=save_mixtral, args=(tmp, args.config))
        saver.start()
        saver.join()
        if saver.exitcode != 0:
            raise SystemExit(f"import_memory: writing the checkpoint failed (exit code {saver.exitcode})")
        files = sorted(Path(tmp, args.config).glob("*.safetensors"))
        checkpoint_bytes = sum(f.stat().st_size for f in files)
        for way in ways:
            per_rank = spawn_ranks(measure, args.world, device.type, tmp, args.config, way)
            results[way] = [{"vmhwm_growth": g, "file_backed_growth": f, "anon_peak_growth": a, "shard_bytes": s,
                             "largest_param": big} for g, f, a, s, big in per_rank]
            g, f, a, s, big = max(per_rank, key=lambda r: r[2] / (r[3] + r[4]))
            rows.append([way, f"{g / MIB:.0f}", f"{f / MIB:.0f}", f"{a / MIB:.0f} (>= {(g - f) / MIB:.0f})",
                         f"{s / MIB:.0f}", f"{big / MIB:.0f}", f"{g / (s + big):.2f}", f"**{a / (s + big):.2f}**"])
    print(f"## Import memory: a Mixtral of the {args.config} config's shape ({checkpoint_bytes / MIB:.0f} MiB fp32 in "
          f"{len(files)} files), world {args.world}, ep {args.world}, gloo, {environment(device)['device']}\n")
    print("The rank with the highest anonymous peak over its bound; MiB. File-backed: the mapped checkpoint pages "
          "resident at the end.\n")
    print(markdown_table(["import", "VmHWM growth", "file-backed", "anonymous peak (lower bound)", "own shards",
                          "largest parameter", "VmHWM / (shards + largest)", "anonymous / (shards + largest)"], rows))
    print(f"\nimport_memory: {time.perf_counter() - start:.0f} s")
    write_results("import_memory", {**environment(device), "config": args.config, "world": args.world,
                                    "ep": args.world, "checkpoint_bytes": checkpoint_bytes, "files": len(files),
                                    "per_rank": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
