"""python -m benchmarks.checkpoint_save: what the checkpoints' CRC-32s cost, as a fraction of the save time.

One process, the small config's model and AdamW state (about 1.7 GB on disk), saved with
torch.distributed.checkpoint three ways in turn: plain DCP; DCP with each file's CRC-32 computed as it
is written (what moe_dist does); and DCP followed by reading every file back for its CRC-32 (the
obvious alternative). Round-robin repeats, the median reported; the previous copy is deleted outside
the timing.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from benchmarks.common import environment, markdown_table, parser, setup, write_results
from moe_dist.checkpoint import _Crc32Writer
from moe_dist.config import load_config
from moe_dist.files import file_crc32
from moe_dist.optim import build_optimizer
from moe_dist.parallel.mesh import build_mesh, exit_process, init_distributed
from moe_dist.train import build_model


def _model_and_optimizer(config: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    cfg = load_config(config, {"parallel.ep": "1", "train.device": "cpu"})
    runtime = init_distributed("cpu")
    model = build_model(cfg, build_mesh(cfg, 1, "cpu"), runtime)
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    for p in model.parameters():  # one step, so that AdamW holds its two moments
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return model, optimizer


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--config", default="small")
    args = p.parse_args(argv)
    device = setup(args)
    model, optimizer = _model_and_optimizer(args.config)

    def state() -> dict:
        return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}

    def read_back(path: Path) -> None:
        dcp.save(state(), storage_writer=FileSystemWriter(path))
        for file in sorted(path.iterdir()):
            file_crc32(file)

    variants = {"DCP": lambda path: dcp.save(state(), storage_writer=FileSystemWriter(path)),
                "DCP + CRC-32 while writing": lambda path: dcp.save(state(), storage_writer=_Crc32Writer(path)),
                "DCP, then CRC-32 read back": read_back}
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    with tempfile.TemporaryDirectory() as root:
        for r in range(args.repeats + 1):  # the first round warms up
            for name in names[r % len(names):] + names[:r % len(names)]:
                path = Path(root) / "ckpt"
                shutil.rmtree(path, ignore_errors=True)
                start = time.perf_counter()
                variants[name](path)
                if r:
                    times[name].append(time.perf_counter() - start)
            checkpoint_bytes = sum(f.stat().st_size for f in path.iterdir())
    dist.destroy_process_group()
    base = statistics.median(times["DCP"])
    rows = [[name, f"{statistics.median(t):.2f}", f"{statistics.median(t) / base - 1:+.1%}"] for name, t in
            times.items()]
    print(f"## Checkpoint save: {args.config} config, {checkpoint_bytes / 1e9:.2f} GB, median of {args.repeats}\n")
    print(markdown_table(["save", "seconds", "vs DCP"], rows))
    write_results("checkpoint_save", {**environment(device), "config": args.config, "bytes": checkpoint_bytes,
                                      "seconds": {name: statistics.median(t) for name, t in times.items()},
                                      "samples": times})
    return 0


if __name__ == "__main__":
    exit_process(main())  # it joined a process group
