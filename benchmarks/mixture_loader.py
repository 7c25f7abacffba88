"""python -m benchmarks.mixture_loader: what a data mixture costs the loader, against one dataset.

Both read the same prepared data (two halves of the standard library's source text, one tokenizer): the plain
DataLoader one half, the MixtureLoader both at 0.7 / 0.3. Timed: one rank's batches of seq_len 128 (the tiny
config's), at world 1 (micro_batch 8) and at rank 0 of world 256 (micro_batch 4: 1024 windows a global batch,
each one placed by the mixture's order on every rank). Reported: batches/s of each and the mixture's time per batch
over the plain loader's, measured round-robin in the same run.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from benchmarks.common import environment, markdown_table, median_times, parser, setup, write_results
from moe_dist.config import MixtureSource
from moe_dist.data.corpus import stdlib_dir, stdlib_texts
from moe_dist.data.loader import DataLoader
from moe_dist.data.mixture import MixtureLoader
from moe_dist.data.prep import prepare

SEQ_LEN, BATCHES = 128, 20
LAYOUTS = ((1, 8), (256, 4))  # (world, micro_batch); rank 0 is timed


def sources(root: Path) -> list[MixtureSource]:
    """Two prepared halves of 4 MB of the standard library's text, the second with the first's tokenizer."""
    texts = list(stdlib_texts(stdlib_dir(), 4 * 2**20))
    dirs = []
    for i, half in enumerate((texts[::2], texts[1::2])):
        (root / f"in{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in half))
        tokenizer = dirs[0] / "tokenizer.json" if dirs else None
        dirs.append(prepare([root / f"in{i}.jsonl"], root / f"half{i}", 4096, tokenizer, workers=1))
    return [MixtureSource(str(dirs[0]), 0.7), MixtureSource(str(dirs[1]), 0.3)]


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    device = setup(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        mixture = sources(Path(tmp))
        for world, micro in LAYOUTS:
            plain = DataLoader(mixture[0].path, "train", SEQ_LEN, micro, 0, world)
            mixed = MixtureLoader(mixture, SEQ_LEN, micro, 0, world)
            times = median_times({name: lambda loader=loader: [next(loader) for _ in range(BATCHES)]
                                  for name, loader in (("plain", plain), ("mixture", mixed))}, device, args.repeats)
            rows.append([world, micro, world * micro, f"{BATCHES / times['plain']:,.0f}",
                         f"{BATCHES / times['mixture']:,.0f}", f"{times['mixture'] / times['plain']:.2f}",
                         f"{times['mixture'] / BATCHES * 1e3:.2f} ms"])
    headers = ["world", "micro_batch", "windows / global batch", "plain batches/s", "mixture batches/s",
               "mixture / plain time", "mixture per batch"]
    print("### Data mixture vs one dataset: the loader alone (`benchmarks/mixture_loader.py`)\n")
    print(markdown_table(headers, rows))
    write_results("mixture_loader", {"environment": environment(device), "headers": headers, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
