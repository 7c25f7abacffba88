"""Memory-mapped token shards, rank-disjoint fixed-length batches, resumable position."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from moe_dist.data import DataError, one_line
from moe_dist.data.manifest import MANIFEST, SHARD_TOKENIZER_KEY, read_manifest, verify_shards
from moe_dist.data.tokenizer import file_hash


def _map_shard(path: Path, dtype: str, tokenizer_hash: str) -> list[np.ndarray]:
    """Zero-copy numpy views of a shard's `tokens` record batches; DataError if another tokenizer made it."""
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"data: {path}: unreadable token shard ({one_line(e)})") from None
    if "tokens" not in reader.schema.names:
        raise DataError(f"data: {path}: no 'tokens' column (columns: {', '.join(reader.schema.names)})")
    kind = reader.schema.field("tokens").type
    if str(kind) != dtype:
        raise DataError(f"data: {path}: tokens are {kind} but the manifest says {dtype}")
    made_with = (reader.schema.metadata or {}).get(SHARD_TOKENIZER_KEY, b"none").decode()
    if made_with != tokenizer_hash:
        raise DataError(f"data: {path}: built with tokenizer {made_with}, but the manifest's is {tokenizer_hash} "
                        f"(shards of another prep?); prepare the data again")
    return [reader.get_batch(i).column("tokens").to_numpy(zero_copy_only=True)
            for i in range(reader.num_record_batches)]


class TokenShards:
    """One split's shards, memory-mapped and read as one token stream."""

    def __init__(self, data_dir: Path | str, split: str):
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        if split not in self.manifest["splits"]:
            raise DataError(f"data: {self.data_dir / MANIFEST}: no split {split!r} "
                            f"(splits: {', '.join(self.manifest['splits'])})")
        self.split = split
        verify_shards(self.data_dir, self.manifest, checksums=False, splits=(split,))
        shards = self.manifest["splits"][split]["shards"]
        made_with = self.manifest["tokenizer"]["hash"]
        self.chunks = [a for s in shards
                       for a in _map_shard(self.data_dir / s["file"], self.manifest["dtype"], made_with)]
        self.starts = np.cumsum([0] + [len(a) for a in self.chunks])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """tokens[start:stop] of the stream: a view inside one chunk, a copy across chunks."""
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        while start < stop:
            end = min(stop, int(self.starts[i + 1]))
            parts.append(self.chunks[i][start - self.starts[i]:end - self.starts[i]])
            start, i = end, i + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _check_global_batch(tokens: int, split: str, data_dir: Path | str, seq_len: int, micro_batch: int,
                        world_size: int) -> None:
    windows = max(tokens - 1, 0) // seq_len
    if windows < world_size * micro_batch:
        raise DataError(f"data: split {split!r} of {data_dir} has {tokens:,} tokens, one global batch needs "
                        f"{world_size * micro_batch * seq_len + 1:,} ({world_size} ranks x {micro_batch} sequences "
                        f"x {seq_len} + 1)")


def check_compatible(data_dir: Path | str, vocab_size: int, seq_len: int, micro_batch: int, world_size: int) -> None:
    """DataError unless the prepared data fits a model of vocab_size, with the manifest's tokenizer and dtype,
    and each split holds at least one global batch."""
    manifest = read_manifest(Path(data_dir))
    tokenizer = Path(data_dir) / manifest["tokenizer"]["file"]
    if not tokenizer.is_file():
        raise DataError(f"data: {tokenizer}: missing (the manifest names it)")
    found = file_hash(tokenizer)
    if found != manifest["tokenizer"]["hash"]:
        raise DataError(f"data: {tokenizer} is not the tokenizer the shards were built with "
                        f"(hash {found}, manifest {manifest['tokenizer']['hash']})")
    if manifest["vocab_size"] != vocab_size:
        raise DataError(f"data: {Path(data_dir) / MANIFEST} was prepared for vocab_size {manifest['vocab_size']}, "
                        f"but model.vocab_size is {vocab_size}")
    for split in ("train", "val"):
        _check_global_batch(len(TokenShards(data_dir, split)), split, data_dir, seq_len, micro_batch, world_size)


class DataLoader:
    """Infinite iterator of (inputs, targets) int64 [micro_batch, seq_len] batches of one split, for one rank.

    Window i is tokens[i*seq_len : i*seq_len + seq_len + 1]: neighbours share one token, so each token but the first
    is a target once per epoch. Each global step takes the next world_size*micro_batch windows of the epoch's order
    and rank r gets the r-th micro_batch of them, so one rank with micro_batch W*B sees exactly what W ranks with B
    see, concatenated in rank order. "train" shuffles the order per epoch, seeded by (seed, epoch); other splits keep
    stream order, and reset() rewinds them so that every evaluation sees the same batches. An epoch ends when less
    than a global batch of windows is left. The position is global, so state_dict() is the same on every rank.
    """

    def __init__(self, data_dir: Path | str, split: str, seq_len: int, micro_batch: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"data: rank {rank} is outside world_size {world_size}")
        self.tokens = TokenShards(data_dir, split)
        self.seq_len, self.micro_batch, self.rank, self.seed = seq_len, micro_batch, rank, seed
        self.global_batch = world_size * micro_batch
        self.n_windows = max(len(self.tokens) - 1, 0) // seq_len
        _check_global_batch(len(self.tokens), split, data_dir, seq_len, micro_batch, world_size)
        self.shuffle = split == "train"
        self.epoch = self.position = 0
        self._order_epoch, self._order = -1, np.arange(0)

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)
            else:
                self._order = np.arange(self.n_windows)
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self) -> DataLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.global_batch > self.n_windows:
            self.epoch, self.position = self.epoch + 1, 0
        first = self.position + self.rank * self.micro_batch
        windows = np.stack([self.tokens.read(i * self.seq_len, (i + 1) * self.seq_len + 1)
                            for i in self._epoch_order()[first:first + self.micro_batch].tolist()])
        self.position += self.global_batch
        # The shards stay uint16/uint32 on disk and in the page cache; only the batch becomes int64.
        inputs = torch.from_numpy(windows[:, :-1].astype(np.int64))
        targets = torch.from_numpy(windows[:, 1:].astype(np.int64))
        return inputs, targets

    def reset(self) -> None:
        """Back to the first batch of epoch 0."""
        self.epoch = self.position = 0

    def state_dict(self) -> dict[str, int]:
        """The position in the global window order (identical on every rank)."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue exactly where the loader that saved `state` would have."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
