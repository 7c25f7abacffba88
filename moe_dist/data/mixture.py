"""Data mixtures: several prepared datasets filling every global batch in the shares of their weights.

The mixture's windows, counted over the global batches (every rank alike), come from the sources in Tijdeman's
chairman-assignment order: window n goes to the source with the earliest deadline among those at least 1 - C behind
their share (C = 1 - 1/(2k - 2) for k sources). Every source's count of windows then stays within C < 1 window of
weight x windows after any number of windows: no sampling drift, and every rank knows the order without
communicating. Each source reads its train windows in its own shuffled order, epoch after epoch: a source that runs
out repeats, and the loader reports when. The position (each source's epoch, position and windows taken, and the
counts since the weights were last changed) is global, so a resumed run continues exactly at any world size; resumed
with other weights, each source continues from its own position and the shares are counted afresh.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import torch

from moe_dist.config import DataConfig, MixtureSource
from moe_dist.data import DataError
from moe_dist.data.loader import Batch, DataLoader, SplitWindows, check_compatible, to_batch
from moe_dist.data.manifest import MANIFEST, read_manifest


def next_sources(weights: np.ndarray, taken: np.ndarray, count: int) -> np.ndarray:
    """The sources of the next `count` windows of a mixture of normalised `weights` that has taken `taken` windows
    of each so far (updated in place)."""
    k = len(weights)
    slack = 1 - 1 / (2 * k - 2) if k > 1 else 0.0
    # Python floats, not numpy: a global batch of 1024 windows over a few sources is ten times faster this way.
    shares, counts, out = weights.tolist(), taken.tolist(), []
    n = sum(counts)
    for _ in range(count):
        n += 1
        best, earliest = 0, math.inf
        for i in range(k):
            # Only a source at least 1 - slack behind may take the window (taking it leaves it at most slack
            # ahead); of those, the one that would first fall more than slack behind.
            if shares[i] * n - counts[i] >= 1 - slack - 1e-9 and (counts[i] + slack) / shares[i] < earliest:
                best, earliest = i, (counts[i] + slack) / shares[i]
        counts[best] += 1
        out.append(best)
    taken[:] = counts
    return np.array(out, dtype=np.int64)


def check_mixture(sources: list[MixtureSource], vocab_size: int, seq_len: int, micro_batch: int,
                  world_size: int) -> Path:
    """DataError unless every source fits the model (check_compatible: each split holds a global batch) and all were
    tokenized with one tokenizer. Returns the first source's directory, whose tokenizer they share."""
    first = Path(sources[0].path)
    tokenizer = read_manifest(first)["tokenizer"]["hash"]
    for source in sources:
        check_compatible(source.path, vocab_size, seq_len, micro_batch, world_size)
        other = read_manifest(Path(source.path))["tokenizer"]["hash"]
        if other != tokenizer:
            raise DataError(f"data: {Path(source.path) / MANIFEST}: tokenized with tokenizer {other}, but "
                            f"{first} with {tokenizer}: the sources of data.mixture must share one tokenizer")
    return first


class MixtureLoader:
    """Infinite iterator of Batch [micro_batch, seq_len] of the train splits of several sources, for one rank.

    Like DataLoader, rank r gets the r-th micro_batch of each global batch, so one rank with micro_batch W*B sees
    exactly what W ranks with B see. Each Batch carries the source of each sequence (Batch.source).
    """

    def __init__(self, sources: list[MixtureSource], seq_len: int, micro_batch: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, document_mask: bool = False, restart_positions: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"data: rank {rank} is outside world_size {world_size}")
        self.names = [s.label for s in sources]  # the sources' names (Batch.source indexes them)
        total = sum(s.weight for s in sources)
        self.weights = np.array([s.weight / total for s in sources])
        self.windows = [SplitWindows(s.path, "train", seq_len, document_mask) for s in sources]
        self.micro_batch, self.rank, self.seed = micro_batch, rank, seed
        self.document_mask, self.restart_positions = document_mask, restart_positions
        self.global_batch = world_size * micro_batch
        k = len(sources)
        self.epoch, self.position, self.taken = [0] * k, [0] * k, [0] * k
        self.phase_taken = np.zeros(k)
        self.repeats: list[tuple[str, int]] = []  # (source, epoch it starts) since the trainer last looked
        self._orders: dict[int, tuple[int, np.ndarray]] = {}

    def _order(self, i: int) -> np.ndarray:
        epoch, order = self._orders.get(i, (-1, None))
        if epoch != self.epoch[i]:
            # Seeded by the source's name, not its place in the list: a resumed mixture may list other sources.
            order = self.windows[i].order([self.seed, zlib.crc32(self.names[i].encode()), self.epoch[i]], True)
            self._orders[i] = (self.epoch[i], order)
        return order

    def _take(self, i: int) -> int:
        """Source i's next window, advancing its position (into its next epoch when it runs out)."""
        window = int(self._order(i)[self.position[i]])
        self.position[i] += 1
        self.taken[i] += 1
        if self.position[i] == len(self.windows[i]):
            self.epoch[i], self.position[i] = self.epoch[i] + 1, 0
            self.repeats.append((self.names[i], self.epoch[i]))
        return window

    def __iter__(self) -> MixtureLoader:
        return self

    def __next__(self) -> Batch:
        sources = next_sources(self.weights, self.phase_taken, self.global_batch)
        windows = [(int(i), self._take(int(i))) for i in sources]  # every rank advances every source alike
        mine = windows[self.rank * self.micro_batch:(self.rank + 1) * self.micro_batch]
        batch = to_batch([self.windows[i].read(w) for i, w in mine], self.document_mask, self.restart_positions)
        return batch._replace(source=torch.tensor([i for i, _ in mine]))

    def tokens_taken(self) -> dict[str, int]:
        """The input tokens each source has given so far (its windows x seq_len)."""
        return {name: taken * self.windows[0].seq_len for name, taken in zip(self.names, self.taken)}

    def state_dict(self) -> dict[str, str]:
        """Every source's position and the shares' counts, by source name (identical on every rank), as JSON: the
        checkpoint's keys do not depend on the sources."""
        state = {"weights": dict(zip(self.names, self.weights.tolist())),
                 "phase_taken": dict(zip(self.names, self.phase_taken.astype(int).tolist())),
                 "sources": {name: {"epoch": e, "position": p, "taken": t}
                             for name, e, p, t in zip(self.names, self.epoch, self.position, self.taken)}}
        return {"mixture": json.dumps(state)}

    def load_state_dict(self, state: dict[str, str]) -> bool:
        """Continue every source where the loader that saved `state` left it (a source it did not have starts at
        its beginning). Returns whether the weights are the saved ones; if not, the shares are counted afresh."""
        saved = json.loads(state["mixture"])  # a checkpoint of one dataset is refused at start-up
        for i, name in enumerate(self.names):
            source = saved["sources"].get(name, {"epoch": 0, "position": 0, "taken": 0})
            if source["position"] >= len(self.windows[i]):
                raise DataError(f"data: the checkpoint's position in source {name!r} ({source['position']}) is beyond "
                                f"its {len(self.windows[i])} windows: was {self.windows[i].tokens.data_dir} prepared "
                                f"again?")
            self.epoch[i], self.position[i], self.taken[i] = source["epoch"], source["position"], source["taken"]
        same = saved["weights"] == dict(zip(self.names, self.weights.tolist()))
        self.phase_taken = np.array([saved["phase_taken"][n] if same else 0 for n in self.names], dtype=float)
        return same


def build_loaders(cfg: DataConfig, data_dir: Path, rank: int, world_size: int
                  ) -> tuple[DataLoader | MixtureLoader, list[tuple[str, float, DataLoader]]]:
    """A run's train loader and its validation splits as (source name, weight, loader): one, named "", for one
    dataset; each source's own for a mixture."""
    options = (cfg.seq_len, cfg.micro_batch, rank, world_size, cfg.seed, cfg.document_mask, cfg.restart_positions)
    if not cfg.mixture:
        return DataLoader(data_dir, "train", *options), [("", 1.0, DataLoader(data_dir, "val", *options))]
    train = MixtureLoader(cfg.mixture, *options)
    val = [(name, weight, DataLoader(source.path, "val", *options))
           for name, weight, source in zip(train.names, train.weights.tolist(), cfg.mixture)]
    return train, val
