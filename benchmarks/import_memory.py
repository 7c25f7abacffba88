"""python -m benchmarks.import_memory: each rank's peak memory while a Hugging Face checkpoint is imported.

A Mixtral of the small config's shape with random weights (transformers' own initialisation), written by
save_pretrained (per-expert keys, fp32, several safetensors files) in a subprocess, so that neither transformers
nor the model is in the parent the ranks are spawned from. It is imported at world 4 on gloo with ep 4, each way
in fresh processes: moe_dist's import (config_from_hf, open_init_weights, build_model reading only the blocks the
rank's shards own) and, for contrast, every rank loading every file whole with safetensors.torch.load_file and
copying its shards out of that. The bound the import promises is a rank's shards plus the largest single
parameter (the one full tensor it may hold at a time).

Quantized checkpoints, which moe_dist dequantizes block by block as it reads (hf/quantized.py), are imported the
same way against the same bound, the largest parameter counted dequantized (fp32): the same Mixtral as DeepSeek-V3
and Kimi K2 ship theirs, the layers' linear weights (attention and experts, not the routers) in FP8 with float32
scales per 128 x 128 block (its per-expert `x.weight` keys go through DeepSeek's reader, read_fp8), and a gpt-oss
of the same shape (save_pretrained, then its experts in MXFP4, as it ships). The load_file ways do not
dequantize, so only moe_dist's import reads these.

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
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from benchmarks.common import environment, markdown_table, parser, setup, spawn_ranks, status_kib, write_results
from benchmarks.startup_memory import MIB, model_bytes, peak, reset_peak
from moe_dist.config import load_config
from moe_dist.hf.config import FAMILIES, config_from_hf, hf_config
from moe_dist.hf.quantized import (E2M1_VALUES, FP8_SCALE_SUFFIX, MXFP4_BLOCKS_SUFFIX, MXFP4_EXPONENT_BIAS,
                                   MXFP4_GROUP, MXFP4_SCALES_SUFFIX)
from moe_dist.hf.weights import INDEX_FILE, HFCheckpoint, open_init_weights
from moe_dist.parallel.mesh import Runtime, build_mesh
from moe_dist.train import build_model

MAX_SHARD_SIZE = "100MB"  # save_pretrained's file size: the small config's 559 MB in 7 files
WARMUP = ("tiny", {"moe.first_k_dense": 0})  # tiny, all MoE as Mixtral is: the warm-up import's checkpoint
FP8_BLOCK = (128, 128)  # DeepSeek-V3's and Kimi K2's quantization_config.weight_block_size
FP8_MAX = 448.0  # the largest float8_e4m3fn value
# The ways a rank imports -> (its checkpoint: "" the Mixtral, "-fp8" in FP8, "-mxfp4" the gpt-oss; load_file's
# backend, None for moe_dist's lazy import). With mmap (safetensors' default) load_file returns views of the map,
# read only where a rank copies from; with pread the whole checkpoint is read into each rank's own memory, as older
# safetensors did and as the naive import means.
WAYS = {"moe_dist import (only the rank's blocks read)": ("", None),
        "load_file every file (mmap: views of the map)": ("", "mmap"),
        "load_file every file, read into memory (pread)": ("", "pread"),
        "moe_dist import, FP8 checkpoint (dequantized by block)": ("-fp8", None),
        "moe_dist import, gpt-oss with MXFP4 experts (dequantized by block)": ("-mxfp4", None)}


def save_checkpoints(directory: str, config: str) -> None:
    """The checkpoints the ranks import, as transformers writes them, of `config`'s shape and WARMUP's: a Mixtral
    (name), the same in FP8 (name + "-fp8") and a gpt-oss with MXFP4 experts (name + "-mxfp4")."""
    import transformers  # only in this subprocess

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    for name, cfg in ((config, load_config(config)), ("warmup", load_config(*WARMUP))):
        path = Path(directory) / name
        values = hf_config(cfg, FAMILIES["mixtral"], "float32", None, None)
        transformers.MixtralForCausalLM(transformers.MixtralConfig.from_dict(values)).save_pretrained(
            path, max_shard_size=MAX_SHARD_SIZE)
        save_quantized(path, Path(f"{path}-fp8"), fp8_tensors,
                       {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                        "weight_block_size": list(FP8_BLOCK)})
        values = hf_config(cfg, FAMILIES["gpt_oss"], "float32", None, None)
        transformers.GptOssForCausalLM(transformers.GptOssConfig.from_dict(values)).save_pretrained(
            f"{path}-gpt-oss", max_shard_size=MAX_SHARD_SIZE)
        save_quantized(Path(f"{path}-gpt-oss"), Path(f"{path}-mxfp4"), mxfp4_tensors, {"quant_method": "mxfp4"})


def fp8_tensors(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """What DeepSeek-V3 stores for tensor `key`: its layers' linear weights (not norms or routers) as FP8 weight and
    float32 scale_inv per FP8_BLOCK, each block divided by its amax / 448 (tests/quantize.py's quantize_fp8)."""
    if ".layers." not in key or value.dim() != 2 or key.endswith(("norm.weight", "gate.weight")):
        return {key: value}
    rows, cols = value.shape
    padded = torch.nn.functional.pad(value, (0, -cols % FP8_BLOCK[1], 0, -rows % FP8_BLOCK[0]))  # the tiny's k/v: 64
    tiles = padded.unflatten(1, (-1, FP8_BLOCK[1])).unflatten(0, (-1, FP8_BLOCK[0]))  # [R, br, C, bc]
    scales = tiles.abs().amax(dim=(1, 3)) / FP8_MAX  # random weights have no all-zero block
    values = (tiles / scales[:, None, :, None]).flatten(2).flatten(0, 1)[:rows, :cols]
    return {key: values.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), key + FP8_SCALE_SUFFIX: scales}


def mxfp4_tensors(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """What gpt-oss stores for tensor `key`: its experts [E, cols, rows] as _blocks [E, rows, G, 16] and _scales
    [E, rows, G], each group of 32 along cols scaled by a power of two to at most 6 and rounded to e2m1, two to a
    byte (tests/quantize.py's quantize_mxfp4)."""
    if not key.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return {key: value}
    groups = value.transpose(1, 2).unflatten(-1, (-1, MXFP4_GROUP))  # [E, rows, G, 32]
    exponents = torch.ceil(torch.log2(groups.abs().amax(dim=-1) / 6.0)).int()  # 6: the largest e2m1 value
    scaled = torch.ldexp(groups, -exponents.unsqueeze(-1))
    codes = (scaled.unsqueeze(-1) - torch.tensor(E2M1_VALUES)).abs().argmin(dim=-1).to(torch.uint8)
    return {key + MXFP4_BLOCKS_SUFFIX: codes[..., 0::2] | (codes[..., 1::2] << 4),
            key + MXFP4_SCALES_SUFFIX: (exponents + MXFP4_EXPONENT_BIAS).to(torch.uint8)}


def save_quantized(source: Path, target: Path, stored: Callable[[str, torch.Tensor], dict[str, torch.Tensor]],
                   quantization_config: dict) -> None:
    """`source`'s checkpoint in `target`, file by file, each tensor as `stored` says, and `quantization_config` in
    its config.json."""
    target.mkdir()
    weight_map = {}
    for path in sorted(source.glob("*.safetensors")):  # the warm-up's tiny checkpoint is one file, with no index
        out = {k: v for key, value in load_file(path).items() for k, v in stored(key, value).items()}
        save_file(out, target / path.name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, path.name))
    if (source / INDEX_FILE).is_file():
        (target / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    config = json.loads((source / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))


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
    suffix, backend = WAYS[way]
    hf_import(Path(directory) / f"warmup{suffix}", world, runtime, backend)  # loads every code path, then freed
    before = reset_peak(device)
    anon_before, file_before = status_kib("RssAnon") * 1024, status_kib("RssFile") * 1024
    sampler = AnonPeak()
    sampler.start()
    model, _weights = hf_import(Path(directory) / f"{config}{suffix}", world, runtime, backend)
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
    has_backend = "backend" in inspect.signature(load_file).parameters
    ways = [way for way, (_, backend) in WAYS.items() if backend is None or has_backend]
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        saver = mp.get_context("spawn").Process(target=save_checkpoints, args=(tmp, args.config))
        saver.start()
        saver.join()
        if saver.exitcode != 0:
            raise SystemExit(f"import_memory: writing the checkpoint failed (exit code {saver.exitcode})")
        files = sorted(Path(tmp, args.config).glob("*.safetensors"))
        checkpoint_bytes = sum(f.stat().st_size for f in files)
        fp8_bytes, mxfp4_bytes = (sum(f.stat().st_size for f in Path(tmp, args.config + suffix).glob("*.safetensors"))
                                  for suffix in ("-fp8", "-mxfp4"))
        for way in ways:
            per_rank = spawn_ranks(measure, args.world, device.type, tmp, args.config, way)
            results[way] = [{"vmhwm_growth": g, "file_backed_growth": f, "anon_peak_growth": a, "shard_bytes": s,
                             "largest_param": big} for g, f, a, s, big in per_rank]
            g, f, a, s, big = max(per_rank, key=lambda r: r[2] / (r[3] + r[4]))
            rows.append([way, f"{g / MIB:.0f}", f"{f / MIB:.0f}", f"{a / MIB:.0f} (>= {(g - f) / MIB:.0f})",
                         f"{s / MIB:.0f}", f"{big / MIB:.0f}", f"{g / (s + big):.2f}", f"**{a / (s + big):.2f}**"])
    print(f"## Import memory: a Mixtral of the {args.config} config's shape ({checkpoint_bytes / MIB:.0f} MiB fp32 in "
          f"{len(files)} files; {fp8_bytes / MIB:.0f} MiB in FP8) and a gpt-oss ({mxfp4_bytes / MIB:.0f} MiB with "
          f"MXFP4 experts), world {args.world}, ep {args.world}, gloo, "
          f"{environment(device)['device']}\n")
    print("The rank with the highest anonymous peak over its bound; MiB. File-backed: the mapped checkpoint pages "
          "resident at the end.\n")
    print(markdown_table(["import", "VmHWM growth", "file-backed", "anonymous peak (lower bound)", "own shards",
                          "largest parameter", "VmHWM / (shards + largest)", "anonymous / (shards + largest)"], rows))
    print(f"\nimport_memory: {time.perf_counter() - start:.0f} s")
    write_results("import_memory", {**environment(device), "config": args.config, "world": args.world,
                                    "ep": args.world, "checkpoint_bytes": checkpoint_bytes,
                                    "fp8_checkpoint_bytes": fp8_bytes, "mxfp4_checkpoint_bytes": mxfp4_bytes,
                                    "files": len(files),
                                    "per_rank": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
