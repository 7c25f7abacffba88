"""Memory-mapped token shards, rank-disjoint fixed-length batches, resumable position.

Each token carries flags (prep writes them): DOC_START on a document's first token, LOSS where the token counts as
a target. Windows of documents ("documents" data) are cut from the token stream; conversations ("chat" data) are
packed whole, as many as fit, and padded. A target that does not count is IGNORE; with document masking, so is
every target that starts a document (it would be predicted across the boundary), and the batch carries each
token's document (`segments`) and, on request, its position within its document.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import torch

from moe_dist.data import DataError, one_line
from moe_dist.data.flags import DOC_START, IGNORE, LOSS
from moe_dist.data.manifest import MANIFEST, SHARD_TOKENIZER_KEY, read_manifest, verify_shards
from moe_dist.data.tokenizer import file_hash


class Batch(NamedTuple):
    inputs: torch.Tensor  # [B, S] int64
    targets: torch.Tensor  # [B, S] int64, IGNORE where the loss does not count
    segments: torch.Tensor | None = None  # [B, S] the document of each token (document masking)
    positions: torch.Tensor | None = None  # [B, S] each token's position within its document
    source: torch.Tensor | None = None  # [B] the mixture source of each sequence (data.mixture)


def _map_shard(path: Path, dtype: str, tokenizer_hash: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Zero-copy numpy views of a shard's (tokens, flags) record batches; DataError if another tokenizer made
    it."""
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"data: {path}: unreadable token shard ({one_line(e)})") from None
    if reader.schema.names != ["tokens", "flags"]:
        raise DataError(f"data: {path}: columns {', '.join(reader.schema.names)}, expected tokens, flags")
    kind = reader.schema.field("tokens").type
    if str(kind) != dtype:
        raise DataError(f"data: {path}: tokens are {kind} but the manifest says {dtype}")
    made_with = (reader.schema.metadata or {}).get(SHARD_TOKENIZER_KEY, b"none").decode()
    if made_with != tokenizer_hash:
        raise DataError(f"data: {path}: built with tokenizer {made_with}, but the manifest's is {tokenizer_hash} "
                        f"(shards of another prep?); prepare the data again")
    return [tuple(reader.get_batch(i).column(c).to_numpy(zero_copy_only=True) for c in ("tokens", "flags"))
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
        self.starts = np.cumsum([0] + [len(tokens) for tokens, _ in self.chunks])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, flags)[start:stop] of the stream: views inside one chunk, copies across chunks."""
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        while start < stop:
            end = min(stop, int(self.starts[i + 1]))
            parts.append(tuple(a[start - self.starts[i]:end - self.starts[i]] for a in self.chunks[i]))
            start, i = end, i + 1
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([t for t, _ in parts]), np.concatenate([f for _, f in parts])

    def document_starts(self) -> np.ndarray:
        """The stream offset of every document's first token, and the stream's end."""
        starts = [np.flatnonzero(flags & DOC_START) + offset for (_, flags), offset in zip(self.chunks, self.starts)]
        return np.concatenate([*starts, [len(self)]])


def pack_documents(starts: np.ndarray, window: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Whole documents (bounded by `starts`) packed in order into windows of at most `window` tokens: a window
    takes documents until the next does not fit. Returns (first token, length) per window."""
    lengths = np.diff(starts)
    if lengths.size and lengths.max() > window:
        raise DataError(f"data: {where} holds a conversation of {int(lengths.max())} tokens, more than data.seq_len "
                        f"+ 1 = {window}; prepare it with --max-tokens {window} (truncating or dropping longer ones)")
    first, length, begin, used = [], [], 0, 0
    for i, n in enumerate(lengths.tolist()):
        if used + n > window:
            first.append(int(starts[begin]))
            length.append(used)
            begin, used = i, 0
        used += n
    if used:
        first.append(int(starts[begin]))
        length.append(used)
    return np.array(first, dtype=np.int64), np.array(length, dtype=np.int64)


def windows_of(shards: TokenShards, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(first token, length) of every window: conversations packed whole, documents cut from the stream (window i
    is tokens[i*seq_len : i*seq_len + seq_len + 1], so neighbours share one token)."""
    if shards.manifest.get("kind") == "chat":
        return pack_documents(shards.document_starts(), seq_len + 1, f"split {shards.split!r} of {shards.data_dir}")
    count = max(len(shards) - 1, 0) // seq_len
    return np.arange(count, dtype=np.int64) * seq_len, np.full(count, seq_len + 1, dtype=np.int64)


def _check_global_batch(windows: int, tokens: int, split: str, data_dir: Path | str, seq_len: int,
                        micro_batch: int, world_size: int) -> None:
    if windows < world_size * micro_batch:
        raise DataError(f"data: split {split!r} of {data_dir} has {tokens:,} tokens in {windows:,} windows of "
                        f"{seq_len} + 1, one global batch needs {world_size * micro_batch} ({world_size} ranks x "
                        f"{micro_batch} sequences)")


def _has_targets(shards: TokenShards) -> bool:
    """The split holds a target token (LOSS, not starting a document): the manifest counts them; for a chat split
    prepared before it did, the flags tell (documents' tokens are all LOSS: a split with a window has targets)."""
    counted = shards.manifest["splits"][shards.split].get("targets")
    if isinstance(counted, int):
        return counted > 0
    if shards.manifest.get("kind") != "chat":
        return True
    return any(np.any((flags & (LOSS | DOC_START)) == LOSS) for _, flags in shards.chunks)


def check_compatible(data_dir: Path | str, vocab_size: int, seq_len: int, micro_batch: int, world_size: int,
                     grad_accum: int = 1) -> None:
    """DataError unless the prepared data fits a model of vocab_size, with the manifest's tokenizer and dtype,
    each split holds targets and at least one global batch, and a training step (grad_accum global batches) fits
    in the train split. (An evaluation reads at most the whole val split: DataLoader.global_batches.)"""
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
        shards = TokenShards(data_dir, split)
        windows = len(windows_of(shards, seq_len)[0])
        _check_global_batch(windows, len(shards), split, data_dir, seq_len, micro_batch, world_size)
        if not _has_targets(shards):
            raise DataError(f"data: split {split!r} of {data_dir} has no target token (every answer cut off or "
                            f"empty), so nothing to learn; prepare it again (prep drops such records)")
        batches = windows // (world_size * micro_batch)
        if split == "train" and grad_accum > batches:
            raise DataError(f"data: train.grad_accum = {grad_accum:,} must be at most {batches:,}, the global batches "
                            f"of {world_size} ranks x {micro_batch} sequences in split {split!r} of {data_dir} "
                            f"({windows:,} windows): one step reads each of its windows once")


class SplitWindows:
    """One split's windows (first token, length each), read as (tokens, flags) padded to seq_len + 1."""

    def __init__(self, data_dir: Path | str, split: str, seq_len: int, document_mask: bool):
        self.tokens = TokenShards(data_dir, split)
        if self.tokens.manifest.get("kind") == "chat" and not document_mask:
            raise DataError(f"data: {data_dir} holds chats, packed several to a window: set data.document_mask = true "
                            f"so that they do not attend to each other")
        self.seq_len = seq_len
        self.first, self.length = windows_of(self.tokens, seq_len)

    def __len__(self) -> int:
        return len(self.first)

    def order(self, seed: list[int], shuffle: bool) -> np.ndarray:
        """The windows in an epoch's order: a permutation seeded by `seed`, or stream order."""
        return np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Window i's tokens and flags, padded to seq_len + 1 with tokens 0 that start a document and never count."""
        first, length = int(self.first[i]), int(self.length[i])
        tokens, flags = self.tokens.read(first, first + length)
        pad = self.seq_len + 1 - length
        if pad:
            tokens = np.concatenate([tokens, np.zeros(pad, tokens.dtype)])
            flags = np.concatenate([flags, np.full(pad, 0, flags.dtype)])
            flags[length] = DOC_START
        return tokens, flags


def to_batch(windows: list[tuple[np.ndarray, np.ndarray]], document_mask: bool, restart_positions: bool) -> Batch:
    """The Batch of `windows` (tokens, flags) of seq_len + 1 each."""
    # The shards stay uint16/uint32 on disk and in the page cache; only the batch becomes int64.
    tokens = np.stack([t for t, _ in windows]).astype(np.int64)
    flags = np.stack([f for _, f in windows])
    counts = (flags[:, 1:] & LOSS) > 0
    if document_mask:  # a target that starts a document would be predicted across the boundary
        counts &= (flags[:, 1:] & DOC_START) == 0
    targets = np.where(counts, tokens[:, 1:], IGNORE)
    batch = Batch(torch.from_numpy(tokens[:, :-1]), torch.from_numpy(targets))
    if not document_mask:
        return batch
    starts = (flags[:, :-1] & DOC_START) > 0
    segments = np.cumsum(starts, axis=1)
    positions = None
    if restart_positions:  # the index since the latest document start (or the window's start)
        index = np.arange(starts.shape[1])
        positions = torch.from_numpy(index - np.maximum.accumulate(np.where(starts, index, 0), axis=1))
    return batch._replace(segments=torch.from_numpy(segments), positions=positions)


class DataLoader:
    """Infinite iterator of Batch [micro_batch, seq_len] of one split, for one rank.

    Each global step takes the next world_size*micro_batch windows of the epoch's order and rank r gets the r-th
    micro_batch of them, so one rank with micro_batch W*B sees exactly what W ranks with B see, concatenated in
    rank order. "train" shuffles the order per epoch, seeded by (seed, epoch); other splits keep stream order, and
    reset() rewinds them so that every evaluation sees the same batches. An epoch ends when less than a global
    batch of windows is left. The position is global, so state_dict() is the same on every rank.
    """

    def __init__(self, data_dir: Path | str, split: str, seq_len: int, micro_batch: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, document_mask: bool = False, restart_positions: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"data: rank {rank} is outside world_size {world_size}")
        self.windows = SplitWindows(data_dir, split, seq_len, document_mask)
        self.micro_batch, self.rank, self.seed = micro_batch, rank, seed
        self.document_mask, self.restart_positions = document_mask, restart_positions
        self.global_batch = world_size * micro_batch
        self.n_windows = len(self.windows)
        _check_global_batch(self.n_windows, len(self.windows.tokens), split, data_dir, seq_len, micro_batch,
                            world_size)
        self.shuffle = split == "train"
        self.epoch = self.position = 0
        self._order_epoch, self._order = -1, np.arange(0)

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = self.windows.order([self.seed, self.epoch], self.shuffle)
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self) -> DataLoader:
        return self

    def __next__(self) -> Batch:
        if self.position + self.global_batch > self.n_windows:
            self.epoch, self.position = self.epoch + 1, 0
        first = self.position + self.rank * self.micro_batch
        windows = [self.windows.read(i) for i in self._epoch_order()[first:first + self.micro_batch].tolist()]
        self.position += self.global_batch
        return to_batch(windows, self.document_mask, self.restart_positions)

    def global_batches(self) -> int:
        """The global batches of one epoch."""
        return self.n_windows // self.global_batch

    def reset(self) -> None:
        """Back to the first batch of epoch 0."""
        self.epoch = self.position = 0

    def state_dict(self) -> dict[str, int]:
        """The position in the global window order (identical on every rank)."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue exactly where the loader that saved `state` would have."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
