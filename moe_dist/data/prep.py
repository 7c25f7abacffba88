"""python -m moe_dist.data.prep: txt | jsonl | parquet -> tokenizer.json, Arrow token shards, manifest.json.

The output directory holds:
  tokenizer.json         byte-level BPE; <|endoftext|> (EOS) follows every document
  train-00000.arrow ...  Arrow IPC files, one column `tokens` (uint16, uint32 above 65536 ids), one record batch,
                         the tokenizer's hash in the schema metadata,
  val-00000.arrow ...    exactly shard_tokens tokens each but the last; val holds the last val_fraction of documents
  manifest.json          written last, atomically: if it exists, every file it lists is complete
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from multiprocessing.pool import Pool
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moe_dist.data import DataError, one_line
from moe_dist.data.tokenizer import eos_id, file_hash, load_tokenizer, train_tokenizer

SUFFIXES = (".txt", ".jsonl", ".parquet")
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SHARD_TOKENIZER_KEY = b"moe_dist.tokenizer_hash"
FORMAT_VERSION = 2  # 2: every shard names its tokenizer in its schema metadata
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)
DEFAULT_SHARD_TOKENS = 2**24
CHUNK_BYTES = 1 << 20  # text per worker task: amortises pickling, keeps memory bounded
PARQUET_BATCH_ROWS = 1024
PROGRESS_SECONDS = 5.0


def find_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given, directories expanded (recursively, sorted) into the data files under them."""
    files = []
    for path in map(Path, inputs):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
            if not found:
                raise DataError(f"data: {path}: no {', '.join(SUFFIXES)} files in this directory")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                raise DataError(f"data: {path}: unsupported file type (expected {', '.join(SUFFIXES)})")
            files.append(path)
        else:
            raise DataError(f"data: {path}: no such file or directory")
    return files


def _parquet_file(path: Path, text_field: str) -> pq.ParquetFile:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"data: {path}: not a readable parquet file ({one_line(e)})") from None
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise DataError(f"data: {path}: no column {text_field!r} (columns: {', '.join(schema.names)})")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"data: {path}: column {text_field!r} is {kind}, not string")
    return parquet


def count_documents(path: Path, text_field: str) -> int:
    """Documents in one file without parsing them (a txt file, a non-blank jsonl line, a parquet row)."""
    if path.stat().st_size == 0:
        raise DataError(f"data: {path}: empty file")
    if path.suffix == ".txt":
        return 1
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            count = sum(1 for line in f if line.strip())
    else:
        count = _parquet_file(path, text_field).metadata.num_rows
    if count == 0:
        raise DataError(f"data: {path}: empty file (no documents)")
    return count


def read_documents(path: Path, text_field: str) -> Iterator[str]:
    """Stream one file's documents, one per count_documents unit (null text reads as "")."""
    if path.suffix == ".txt":
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"data: {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    elif path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise DataError(f"data: {path}:{lineno}: not valid JSON ({one_line(e)})") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise DataError(f"data: {path}:{lineno}: no {text_field!r} field")
                text = record[text_field]
                if not isinstance(text, (str, type(None))):
                    raise DataError(f"data: {path}:{lineno}: field {text_field!r} is {type(text).__name__}, not str")
                yield text or ""
    else:
        parquet = _parquet_file(path, text_field)
        try:
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
                for text in batch.column(0).to_pylist():
                    yield text or ""
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"data: {path}: unreadable parquet data ({one_line(e)})") from None


def _documents(files: list[Path], text_field: str) -> Iterator[str]:
    return itertools.chain.from_iterable(read_documents(f, text_field) for f in files)


def fingerprint(files: list[Path], options: dict) -> str:
    """Hash of the inputs' paths, sizes and mtimes and the options: equal means the output can be reused."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def read_manifest(data_dir: Path) -> dict:
    """The manifest of a prepared directory; DataError naming the directory if it has none."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"data: {data_dir}: no {MANIFEST} here; prepare it with python -m moe_dist.data.prep")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"data: {path}: unreadable ({one_line(e)})") from None


def _reusable(out_dir: Path, fp: str) -> bool:
    try:
        manifest = read_manifest(out_dir)
    except DataError:
        return False
    if manifest.get("fingerprint") != fp:
        return False
    names = [shard["file"] for split in manifest["splits"].values() for shard in split["shards"]]
    return all((out_dir / name).is_file() for name in [manifest["tokenizer"]["file"], *names])


class _Progress:
    """Counts documents, bytes and tokens; a line to stderr every PROGRESS_SECONDS."""

    def __init__(self, what: str):
        self.what = what
        self.docs = self.bytes = self.tokens = 0
        self.start = self.last = time.monotonic()

    def update(self, docs: int, nbytes: int, tokens: int = 0) -> None:
        self.docs, self.bytes, self.tokens = self.docs + docs, self.bytes + nbytes, self.tokens + tokens
        if time.monotonic() - self.last >= PROGRESS_SECONDS:
            self.last = time.monotonic()
            self.report()

    def track(self, texts: Iterable[str]) -> Iterator[str]:
        for text in texts:
            self.update(1, len(text.encode()))
            yield text

    def report(self) -> None:
        seconds = time.monotonic() - self.start
        tokens = f", {self.tokens / 1e6:.2f}M tokens" if self.tokens else ""
        print(f"prep: {self.what}: {self.docs:,} docs{tokens}, {self.bytes / 1e6:.1f} MB in {seconds:.1f} s"
              f" ({self.bytes / 1e6 / max(seconds, 1e-6):.1f} MB/s)", file=sys.stderr, flush=True)


_worker: tuple = ()  # (tokenizer, eos id, dtype), set once per worker process


def _init_worker(tokenizer_path: str, eos: int, dtype: str) -> None:
    global _worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism; one thread per worker
    _worker = (load_tokenizer(Path(tokenizer_path)), eos, dtype)


def _encode(task: tuple[str, list[str]]) -> tuple[str, np.ndarray, int, int]:
    """(split, texts) -> (split, ids with EOS after each non-empty document, documents, UTF-8 bytes)."""
    split, texts = task
    tokenizer, eos, dtype = _worker
    docs = len(texts)
    texts = [t for t in texts if t]  # an empty document would add a lone EOS
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    ids = np.fromiter(itertools.chain.from_iterable(e.ids + [eos] for e in encodings), dtype=dtype)
    return split, ids, docs, sum(len(t.encode()) for t in texts)


def _tasks(files: list[Path], text_field: str, n_train: int) -> Iterator[tuple[str, list[str]]]:
    """(split, texts) work items of about CHUNK_BYTES, never straddling the train/val boundary."""
    texts, size, split = [], 0, "train"
    for i, text in enumerate(_documents(files, text_field)):
        doc_split = "train" if i < n_train else "val"
        if texts and (doc_split != split or size >= CHUNK_BYTES):
            yield split, texts
            texts, size = [], 0
        split = doc_split
        texts.append(text)
        size += len(text)
    if texts:
        yield split, texts


def _in_order(pool: Pool, tasks: Iterator, depth: int) -> Iterator:
    """Like pool.imap, but with at most `depth` tasks in flight: imap reads all input ahead into memory."""
    pending = collections.deque()
    for task in tasks:
        pending.append(pool.apply_async(_encode, (task,)))
        if len(pending) >= depth:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class _ShardWriter:
    """Cuts one split's token stream into Arrow IPC files of shard_tokens tokens (the last one shorter)."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, dtype: str, tokenizer_hash: str):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.schema = pa.schema([("tokens", pa.from_numpy_dtype(np.dtype(dtype)))],
                                metadata={SHARD_TOKENIZER_KEY: tokenizer_hash})
        self.parts, self.buffered, self.shards, self.docs = [], 0, [], 0

    def add(self, ids: np.ndarray, docs: int) -> None:
        self.docs += docs
        while ids.size:
            take = min(ids.size, self.shard_tokens - self.buffered)
            self.parts.append(ids[:take])
            self.buffered += take
            ids = ids[take:]
            if self.buffered == self.shard_tokens:
                self._flush()

    def _flush(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.arrow"
        tokens = np.concatenate(self.parts)
        # One record batch per shard: the loader maps it as a single contiguous array.
        with pa.ipc.new_file(str(self.out_dir / name), self.schema) as writer:
            writer.write_batch(pa.record_batch([pa.array(tokens)], schema=self.schema))
        self.shards.append({"file": name, "tokens": int(tokens.size)})
        self.parts, self.buffered = [], 0

    def close(self) -> dict:
        if self.buffered:
            self._flush()
        return {"shards": self.shards, "tokens": sum(s["tokens"] for s in self.shards), "documents": self.docs}


def _tokenize(files: list[Path], text_field: str, n_train: int, out_dir: Path, tokenizer_path: Path, eos: int,
              dtype: str, workers: int, shard_tokens: int) -> dict:
    writers = {split: _ShardWriter(out_dir, split, shard_tokens, dtype, file_hash(tokenizer_path))
               for split in ("train", "val")}
    progress = _Progress("tokenizing")
    # spawn, not fork: the parent may hold threads (the tokenizer trainer's, torch's) that fork would not copy.
    with mp.get_context("spawn").Pool(workers, _init_worker, (str(tokenizer_path), eos, dtype)) as pool:
        for split, ids, docs, nbytes in _in_order(pool, _tasks(files, text_field, n_train), 2 * workers):
            writers[split].add(ids, docs)
            progress.update(docs, nbytes, ids.size)
    progress.report()
    return {split: writer.close() for split, writer in writers.items()}


def _check_options(vocab_size: int, workers: int, shard_tokens: int, val_fraction: float) -> None:
    for name, value in (("vocab_size", vocab_size), ("workers", workers), ("shard_tokens", shard_tokens)):
        if value < 1:
            raise DataError(f"data: {name} = {value} must be >= 1")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data: val_fraction = {val_fraction} must be in [0, 1)")


def prepare(inputs: list[Path], out_dir: Path, vocab_size: int, tokenizer: Path | None = None,
            text_field: str = "text", workers: int = DEFAULT_WORKERS, shard_tokens: int = DEFAULT_SHARD_TOKENS,
            val_fraction: float = 0.02) -> Path:
    """Tokenize inputs into out_dir, or reuse out_dir if it was prepared from the same inputs and options."""
    _check_options(vocab_size, workers, shard_tokens, val_fraction)
    out_dir = Path(out_dir)
    files = find_inputs(inputs)
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise DataError(f"data: {tokenizer}: no such tokenizer file")
    options = {"format": FORMAT_VERSION, "vocab_size": vocab_size, "text_field": text_field,
               "shard_tokens": shard_tokens, "val_fraction": val_fraction,
               "tokenizer": file_hash(tokenizer) if tokenizer is not None else None}
    fp = fingerprint(files, options)
    if _reusable(out_dir, fp):
        print(f"prep: reusing {out_dir} (same inputs and options, fingerprint {fp})", file=sys.stderr)
        return out_dir

    out_dir.mkdir(parents=True, exist_ok=True)
    # The old manifest goes first so that it never describes shards that are being rewritten.
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for stale in [*out_dir.glob("train-*.arrow"), *out_dir.glob("val-*.arrow")]:
        stale.unlink()
    n_docs = sum(count_documents(f, text_field) for f in files)  # fails fast on empty or broken files
    n_val = min(max(round(n_docs * val_fraction), 1), n_docs - 1) if val_fraction > 0 else 0

    tokenizer_path = out_dir / TOKENIZER_FILE
    if tokenizer is None:
        progress = _Progress("training the tokenizer")
        train_tokenizer(progress.track(_documents(files, text_field)), vocab_size).save(str(tokenizer_path))
        progress.report()
    elif Path(tokenizer).resolve() != tokenizer_path.resolve():
        shutil.copyfile(tokenizer, tokenizer_path)
    tok = load_tokenizer(tokenizer_path)
    if tok.get_vocab_size() > vocab_size:
        raise DataError(f"data: {tokenizer}: {tok.get_vocab_size()} tokens, more than vocab_size {vocab_size}")
    eos = eos_id(tok, tokenizer_path)
    dtype = "uint16" if vocab_size <= 2**16 else "uint32"

    splits = _tokenize(files, text_field, n_docs - n_val, out_dir, tokenizer_path, eos, dtype, workers, shard_tokens)
    manifest = {
        "format": FORMAT_VERSION,
        "fingerprint": fp,
        "options": options,
        "input_files": len(files),
        "tokenizer": {"file": TOKENIZER_FILE, "hash": file_hash(tokenizer_path)},
        "vocab_size": vocab_size,
        "tokenizer_vocab_size": tok.get_vocab_size(),
        "dtype": dtype,
        "eos_id": eos,
        "splits": splits,
    }
    tmp = out_dir / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out_dir / MANIFEST)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; a DataError prints one line and exits 2."""
    parser = argparse.ArgumentParser(prog="python -m moe_dist.data.prep", description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, type=Path, help="files, or directories to search")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, help="use this tokenizer.json instead of training one")
    parser.add_argument("--text-field", default="text", help="jsonl field / parquet column holding the text")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    parser.add_argument("--val-fraction", type=float, default=0.02)
    args = parser.parse_args(argv)
    try:
        out = prepare(args.input, args.out, args.vocab_size, args.tokenizer, args.text_field, args.workers,
                      args.shard_tokens, args.val_fraction)
    except DataError as e:
        print(e, file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
