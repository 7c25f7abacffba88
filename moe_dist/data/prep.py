"""python -m moe_dist.data.prep: txt | jsonl | parquet -> tokenizer.json, Arrow token shards, manifest.json.

Documents (or, with --chat, chats and prompt/completion pairs: moe_dist.data.chat) become one token stream.
The output directory holds:
  tokenizer.json         byte-level BPE; <|endoftext|> (EOS) follows every document
  train-00000.arrow ...  Arrow IPC files, one record batch of two columns: `tokens` (uint16, uint32 above 65536
                         ids) and `flags` (uint8: loader.DOC_START on a document's first token, loader.LOSS where
                         the token counts as a target), the tokenizer's hash in the schema metadata
  val-00000.arrow ...    the last whole documents, as close to val_fraction of the tokens as documents allow
  manifest.json          counts, options, and each shard's size and CRC-32
Every input is read and checked before anything is written; the result is built in a hidden directory
beside --out and swapped in whole, so a refused or killed prep leaves an earlier result as it was.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from multiprocessing.pool import Pool
from pathlib import Path

import numpy as np
import pyarrow as pa

from moe_dist.cli import OneLineParser, error_line
from moe_dist.data import DataError, one_line
from moe_dist.data.chat import ChatRenderer, Example, chat_template, read_examples
from moe_dist.data.documents import check_file, find_inputs, read_documents
from moe_dist.data.flags import DOC_START, LOSS
from moe_dist.data.manifest import (FORMAT_VERSION, SHARD_TOKENIZER_KEY, read_manifest, shard_record, verify_shards,
                                    write_manifest)
from moe_dist.data.tokenizer import (EOS_TOKEN, MIN_VOCAB, TOKENIZER_CONFIG, bos_id, bos_token, eos_id, eos_token,
                                     file_hash, load_tokenizer, train_tokenizer)
from moe_dist.files import staging_dir, swap_in, unwritable_reason

TOKENIZER_FILE = "tokenizer.json"
PREP_FILES = re.compile(r"manifest\.json|tokenizer\.json|(train|val)-\d{5}\.arrow")  # what prep writes in --out
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)
DEFAULT_SHARD_TOKENS = 2**24
CHUNK_BYTES = 1 << 20  # text per worker task: amortises pickling, keeps memory bounded
PROGRESS_SECONDS = 5.0


def fingerprint(files: list[Path], options: dict) -> str:
    """Hash of the inputs' paths, sizes and mtimes and the options: equal means the output can be reused."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _reusable(out_dir: Path, fp: str) -> bool:
    """out_dir holds a complete, intact result of the same inputs and options."""
    try:
        manifest = read_manifest(out_dir)
    except DataError:
        return False
    if manifest.get("fingerprint") != fp:
        return False
    try:
        if file_hash(out_dir / manifest["tokenizer"]["file"]) != manifest["tokenizer"]["hash"]:
            raise DataError(f"data: {out_dir / manifest['tokenizer']['file']}: not the tokenizer of the shards")
        verify_shards(out_dir, manifest, checksums=True)
    except (DataError, OSError) as e:
        print(f"prep: {e}: preparing {out_dir} again", file=sys.stderr)
        return False
    return True


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


@dataclass(frozen=True)
class RecordOptions:
    """What the inputs are and what to do with records that do not fit."""

    chat: bool = False  # chat / prompt-completion .jsonl (supervised fine-tuning): loss on the answers only
    max_tokens: int = 0  # a document's or conversation's most tokens; 0 = no limit
    overlong: str = "truncate"  # truncate | drop, a document of more than max_tokens
    bad_records: str = "error"  # error | skip (counted), a chat record that is not one


# What prep counts of the records it does not keep whole (the manifest's "skipped"), as its report says it.
SKIPPED = {"empty": "empty documents skipped", "bad": "bad records skipped", "truncated": "truncated to --max-tokens",
           "dropped": "dropped for exceeding --max-tokens", "no_target": "dropped with no target token left"}

Stream = tuple[np.ndarray, np.ndarray]  # a piece of the token stream: tokens and their flags (data.flags)


_worker: tuple = ()  # (tokenizer, [BOS id] or [], EOS id, dtype, RecordOptions), set once per worker process


def _init_worker(tokenizer_path: str, bos: int | None, eos: int, dtype: str, records: RecordOptions) -> None:
    global _worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism; one thread per worker
    # Ctrl-C reaches the whole process group: the parent stops the pool and says so, in one line. SIGTERM stays
    # the default (a silent exit): it is how the pool ends its workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker = (load_tokenizer(Path(tokenizer_path)), [] if bos is None else [bos], eos, dtype, records)


def _answer_flags(encoding, example: Example) -> np.ndarray:
    """LOSS on the tokens of a chat that overlap an answer's span (a token may start in the prompt: " Paris")."""
    offsets = np.array(encoding.offsets, dtype=np.int64).reshape(-1, 2)
    spans = np.array(example.spans, dtype=np.int64).reshape(-1, 2)
    # Characters inside an answer, counted up to each position: a token holds one if the count grows across it.
    # Linear in characters + tokens + spans (a test per span would be quadratic in turns).
    edges = np.zeros(len(example.text) + 1, dtype=np.int64)
    np.add.at(edges, spans[:, 0], 1)
    np.add.at(edges, spans[:, 1], -1)
    inside = np.concatenate([[0], np.cumsum(np.cumsum(edges)[:-1] > 0)])
    return np.where(inside[offsets[:, 1]] > inside[offsets[:, 0]], LOSS, 0).astype(np.uint8)


def _targets(flags: np.ndarray | None, length: int) -> int:
    """A record's target tokens: its LOSS tokens after the first, which is never one (it would be predicted from
    the record before; chats are trained with data.document_mask). Flags None: every token is LOSS."""
    return max(length - 1, 0) if flags is None else int(np.count_nonzero(flags[1:] & LOSS))


def _encode(items: list[str | Example | None]) -> tuple[Stream, np.ndarray, collections.Counter, int]:
    """Documents or chats -> (their stream, [tokens, targets] per kept document, counts of what was seen and
    skipped, bytes).

    A document is BOS (where the tokenizer has one), its tokens and EOS, every one a target; a chat is its rendered
    text, the targets being the tokens of its answers. Each starts with DOC_START."""
    tokenizer, bos, eos, dtype, records = _worker
    counts = collections.Counter(records=len(items), bad=sum(item is None for item in items))
    present = [item for item in items if item is not None]
    texts = [item if isinstance(item, str) else item.text for item in present]
    kept = [(item, text) for item, text in zip(present, texts) if text]
    counts["empty"] = len(texts) - len(kept)  # an empty document would add a lone EOS
    encodings = tokenizer.encode_batch([text for _, text in kept], add_special_tokens=False)
    ids, flags, doc_targets = [], [], []
    for encoding, (item, _) in zip(encodings, kept):
        doc_ids = bos + encoding.ids + [eos] if isinstance(item, str) else encoding.ids
        doc_flags = None if isinstance(item, str) else _answer_flags(encoding, item)  # None: all LOSS
        overlong = bool(records.max_tokens) and len(doc_ids) > records.max_tokens
        if overlong and records.overlong == "drop":
            counts["dropped"] += 1
            continue
        if overlong:
            doc_ids = doc_ids[:records.max_tokens]
            doc_flags = None if doc_flags is None else doc_flags[:records.max_tokens]
        targets = _targets(doc_flags, len(doc_ids))
        if not targets:  # it would only add tokens that teach nothing (an answer cut off, an empty pair)
            counts["no_target"] += 1
            continue
        counts["truncated"] += overlong
        doc_targets.append(targets)
        ids.append(doc_ids)
        flags.append(doc_flags)
    lengths = np.array([len(d) for d in ids], dtype=np.int64)
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    if all(f is None for f in flags):
        token_flags = np.full(tokens.size, LOSS, dtype=np.uint8)
    else:
        token_flags = np.concatenate([np.full(n, LOSS, np.uint8) if f is None else f for f, n in zip(flags, lengths)])
    token_flags[np.cumsum(lengths) - lengths] |= DOC_START
    docs = np.stack([lengths, np.array(doc_targets, dtype=np.int64)])
    return (tokens, token_flags), docs, counts, sum(len(t.encode()) for t in texts)


def _items(files: list[Path], text_field: str, renderer: ChatRenderer | None,
           skip_bad: bool) -> Iterator[str | Example | None]:
    """Every input record in order: a document's text, or (with a renderer) a chat's Example, None if skipped."""
    for path in files:
        yield from read_documents(path, text_field) if renderer is None else read_examples(path, renderer, skip_bad)


def _tasks(items: Iterator[str | Example | None]) -> Iterator[list[str | Example | None]]:
    """Lists of records of about CHUNK_BYTES, in input order."""
    task, size = [], 0
    for item in items:
        task.append(item)
        size += 0 if item is None else len(item if isinstance(item, str) else item.text)
        if size >= CHUNK_BYTES:
            yield task
            task, size = [], 0
    if task:
        yield task


def _in_order(pool: Pool, tasks: Iterator, depth: int) -> Iterator:
    """Like pool.imap, but with at most `depth` tasks in flight: imap reads all input ahead into memory."""
    pending = collections.deque()
    for task in tasks:
        pending.append(pool.apply_async(_encode, (task,)))
        if len(pending) >= depth:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _write_shard(path: Path, piece: Stream, schema: pa.Schema) -> dict:
    # One record batch per shard: the loader maps each column as a single contiguous array.
    try:
        with pa.ipc.new_file(str(path), schema) as writer:
            writer.write_batch(pa.record_batch([pa.array(column) for column in piece], schema=schema))
    except OSError as e:  # Arrow's names no file: a full disk would be one line without the path
        raise OSError(e.errno, os.strerror(e.errno) if e.errno else one_line(e), str(path)) from None
    return shard_record(path, int(piece[0].size))


class _ShardWriter:
    """Cuts a token stream into Arrow IPC files `<prefix>-<k>.arrow` of shard_tokens tokens (the last shorter),
    numbered from `first`."""

    def __init__(self, out_dir: Path, prefix: str, shard_tokens: int, schema: pa.Schema, first: int = 0):
        self.out_dir, self.prefix, self.shard_tokens, self.schema = out_dir, prefix, shard_tokens, schema
        self.first = first
        self.parts, self.buffered, self.shards = [], 0, []

    def add(self, piece: Stream) -> None:
        while piece[0].size:
            take = min(piece[0].size, self.shard_tokens - self.buffered)
            self.parts.append(tuple(column[:take] for column in piece))
            self.buffered += take
            piece = tuple(column[take:] for column in piece)
            if self.buffered == self.shard_tokens:
                self._flush()

    def _flush(self) -> None:
        path = self.out_dir / f"{self.prefix}-{self.first + len(self.shards):05d}.arrow"
        joined = tuple(np.concatenate([part[c] for part in self.parts]) for c in range(2))
        self.shards.append(_write_shard(path, joined, self.schema))
        self.parts, self.buffered = [], 0

    def close(self) -> list[dict]:
        if self.buffered:
            self._flush()
        return self.shards


def _read_shard(path: Path) -> Stream:
    """A shard's tokens and flags, memory-mapped."""
    batch = pa.ipc.open_file(pa.memory_map(str(path))).get_batch(0)
    return batch.column(0).to_numpy(), batch.column(1).to_numpy()


def val_documents(doc_tokens: np.ndarray, val_fraction: float) -> tuple[int, int]:
    """The documents [first, end) that the val split takes: the latest run of whole documents that fits in
    val_fraction of all tokens, taken back from the last document that fits alone (longer ones at the end stay in
    train). At least one document in each split: the smallest one when none fits; none for val_fraction 0 or a
    single document."""
    n = len(doc_tokens)
    if val_fraction == 0 or n < 2:
        return n, n
    target = val_fraction * doc_tokens.sum()
    fitting = np.flatnonzero(doc_tokens <= target)
    if fitting.size == 0:
        smallest = int(np.argmin(doc_tokens))
        return smallest, smallest + 1
    last = int(fitting[-1])
    taken = int(np.searchsorted(np.cumsum(doc_tokens[last::-1]), target, side="right"))
    return last + 1 - taken, last + 1


def _pieces(chunks: list[Stream], starts: np.ndarray, lo: int, hi: int) -> Iterator[Stream]:
    """stream[lo:hi] of the stream held in `chunks` (starting at `starts`), chunk by chunk."""
    for chunk, start in zip(chunks, starts):
        a, b = max(lo, start), min(hi, start + len(chunk[0]))
        if a < b:
            yield tuple(column[a - start:b - start] for column in chunk)


def _split(staging: Path, stream: _ShardWriter, val_start: int, val_end: int) -> tuple[list[dict], list[dict]]:
    """The closed stream's shards -> (train shards, val shards): val takes tokens [val_start, val_end), train the
    rest. Shards before val_start are renamed; the shard holding val_start and all after it are written again."""
    shards = stream.close()
    paths = [staging / shard["file"] for shard in shards]
    chunks = [_read_shard(path) for path in paths]
    starts = np.cumsum([0] + [len(tokens) for tokens, _ in chunks])
    train = []
    for shard, path, chunk, start in zip(shards, paths, chunks, starts):
        if start + len(chunk[0]) <= val_start:
            train.append({**shard, "file": f"train-{len(train):05d}.arrow"})
            os.rename(path, staging / train[-1]["file"])
        elif start < val_start:
            head = tuple(column[:val_start - start] for column in chunk)
            train.append(_write_shard(staging / f"train-{len(train):05d}.arrow", head, stream.schema))
    rest, val = (_ShardWriter(staging, prefix, stream.shard_tokens, stream.schema, first)
                 for prefix, first in (("train", len(train)), ("val", 0)))
    for piece in _pieces(chunks, starts, val_start, val_end):
        val.add(piece)
    for piece in _pieces(chunks, starts, val_end, int(starts[-1])):
        rest.add(piece)
    for path in paths:
        path.unlink(missing_ok=True)  # the renamed ones are gone already
    return train + rest.close(), val.close()


def _tokenize(items: Iterator[str | Example | None], staging: Path, tokenizer_path: Path, bos: int | None, eos: int,
              dtype: str, records: RecordOptions, workers: int, shard_tokens: int, val_fraction: float) -> dict:
    schema = pa.schema([("tokens", pa.from_numpy_dtype(np.dtype(dtype))), ("flags", pa.uint8())],
                       metadata={SHARD_TOKENIZER_KEY: file_hash(tokenizer_path)})
    stream = _ShardWriter(staging, "stream", shard_tokens, schema)
    progress, docs, counts = _Progress("tokenizing"), [], collections.Counter()
    # spawn, not fork: the parent may hold threads (the tokenizer trainer's, torch's) that fork would not copy.
    with mp.get_context("spawn").Pool(workers, _init_worker, (str(tokenizer_path), bos, eos, dtype, records)) as pool:
        for piece, piece_docs, seen, nbytes in _in_order(pool, _tasks(items), 2 * workers):
            stream.add(piece)
            docs.append(piece_docs)
            counts += seen
            progress.update(seen["records"], nbytes, piece[0].size)
    progress.report()
    doc_tokens, doc_targets = np.concatenate(docs, axis=1) if docs else np.zeros((2, 0), np.int64)
    first, last = val_documents(doc_tokens, val_fraction)
    offsets = np.concatenate([[0], np.cumsum(doc_tokens)])
    train, val = _split(staging, stream, int(offsets[first]), int(offsets[last]))
    val_tokens, val_targets = int(offsets[last] - offsets[first]), int(doc_targets[first:last].sum())
    return {"train": {"shards": train, "tokens": int(offsets[-1]) - val_tokens,
                      "documents": len(doc_tokens) - (last - first), "targets": int(doc_targets.sum()) - val_targets},
            "val": {"shards": val, "tokens": val_tokens, "documents": last - first, "targets": val_targets},
            "skipped": {why: counts[why] for why in SKIPPED}}


def _check_options(vocab_size: int, workers: int, shard_tokens: int, val_fraction: float, train_one: bool,
                   max_tokens: int = 0) -> None:
    if max_tokens < 0:
        raise DataError(f"data: max_tokens = {max_tokens} must be >= 0 (0: no limit)")
    for name, value in (("workers", workers), ("shard_tokens", shard_tokens)):
        if value < 1:
            raise DataError(f"data: {name} = {value} must be >= 1")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data: val_fraction = {val_fraction} must be in [0, 1)")
    check_vocab_size(vocab_size, train_one)


def check_vocab_size(vocab_size: int, train_one: bool) -> None:
    """DataError unless vocab_size can hold a tokenizer (with train_one: one that prep trains)."""
    if vocab_size < 1:
        raise DataError(f"data: vocab_size = {vocab_size} must be >= 1")
    if train_one and vocab_size < MIN_VOCAB:
        raise DataError(f"data: vocab_size = {vocab_size} is too small for a byte-level tokenizer (min {MIN_VOCAB})")


def _check_out_dir(out_dir: Path, files: list[Path]) -> Path:
    """The directory prep will replace, checked: not a file, no inputs inside, nothing in it that prep did not write."""
    out_dir = out_dir.resolve()  # a link to a directory elsewhere: the result goes there, beside its target
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"data: --out {out_dir} is a file; prep writes a directory")
    for path in files:
        if out_dir in path.resolve().parents:
            raise DataError(f"data: input {path} is inside --out {out_dir}, which prep replaces; write elsewhere")
    if out_dir.is_dir():
        foreign = [p.name for p in sorted(out_dir.iterdir()) if not PREP_FILES.fullmatch(p.name)]
        if foreign:
            raise DataError(f"data: --out {out_dir} holds {foreign[0]!r}, which prep did not write (prep replaces the "
                            f"whole directory); give an empty or new directory")
    reason = unwritable_reason(out_dir.parent)
    if reason is not None:
        raise DataError(f"data: --out {out_dir}: {reason}")
    return out_dir


def given_tokenizer(tokenizer: Path, vocab_size: int) -> None:
    """DataError unless `tokenizer` (a tokenizer.json) loads, names its EOS and fits in vocab_size."""
    tok = load_tokenizer(tokenizer)
    eos_id(tok, tokenizer)
    bos_id(tok, tokenizer)
    if tok.get_vocab_size() > vocab_size:
        raise DataError(f"data: {tokenizer}: {tok.get_vocab_size()} tokens, more than vocab_size {vocab_size}")


def _beside_hash(path: Path | None, name: str) -> str | None:
    """The hash of file `name` beside `path`, None where there is none."""
    beside = None if path is None else Path(path).parent / name
    return file_hash(beside) if beside is not None and beside.is_file() else None


def _renderer(records: RecordOptions, tokenizer: Path | None) -> ChatRenderer | None:
    """The chat renderer, with the given tokenizer's chat template and special tokens, or the built-in ones."""
    if not records.chat:
        return None
    if tokenizer is None:
        return ChatRenderer(None, "", EOS_TOKEN)
    return ChatRenderer(chat_template(tokenizer), bos_token(tokenizer) or "", eos_token(tokenizer))


def _build(files: list[Path], staging: Path, vocab_size: int, tokenizer: Path | None, text_field: str,
           records: RecordOptions, workers: int, shard_tokens: int, val_fraction: float, fp: str,
           options: dict) -> dict:
    """The whole result in `staging`: tokenizer, shards, manifest."""
    tokenizer_path = staging / TOKENIZER_FILE
    renderer = _renderer(records, tokenizer)
    if tokenizer is None:
        progress = _Progress("training the tokenizer")
        texts = (item if isinstance(item, str) else item.text
                 for item in _items(files, text_field, renderer, skip_bad=True) if item is not None)
        # Written from Python, not Tokenizer.save: a full disk is then an OSError naming the file.
        tokenizer_path.write_text(train_tokenizer(progress.track(texts), vocab_size).to_str(pretty=True),
                                  encoding="utf-8")
        progress.report()
    else:
        shutil.copyfile(tokenizer, tokenizer_path)
    tok = load_tokenizer(tokenizer_path)
    dtype = "uint16" if vocab_size <= 2**16 else "uint32"
    # A given tokenizer's BOS and EOS may be named beside it (a Hugging Face tokenizer_config.json).
    bos, eos = bos_id(tok, tokenizer or tokenizer_path), eos_id(tok, tokenizer or tokenizer_path)
    items = _items(files, text_field, renderer, records.bad_records == "skip")
    splits = _tokenize(items, staging, tokenizer_path, bos, eos, dtype, records, workers, shard_tokens, val_fraction)
    skipped = splits.pop("skipped")
    if not splits["train"]["targets"] + splits["val"]["targets"]:  # training on it would log loss 0, ppl 1
        inputs = str(files[0]) if len(files) == 1 else f"{files[0]} and {len(files) - 1} more inputs"
        raise DataError(f"data: {inputs}: no record has a target token left ({', '.join(_skipped_parts(skipped))})"
                        f", so nothing to learn")
    manifest = {
        "format": FORMAT_VERSION, "fingerprint": fp, "options": options, "input_files": len(files),
        "kind": "chat" if records.chat else "documents",
        "tokenizer": {"file": TOKENIZER_FILE, "hash": file_hash(tokenizer_path)},
        "vocab_size": vocab_size, "tokenizer_vocab_size": tok.get_vocab_size(), "dtype": dtype, "eos_id": eos,
        "bos_id": bos, "skipped": skipped, "splits": splits,
    }
    write_manifest(staging, manifest)
    return manifest


def _skipped_parts(skipped: dict[str, int]) -> list[str]:
    return [f"{n:,} {SKIPPED[why]}" for why, n in skipped.items() if n]


def _report(out_dir: Path, manifest: dict) -> None:
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    share = val["tokens"] / max(train["tokens"] + val["tokens"], 1)
    print(f"prep: {out_dir}: train {train['tokens']:,} tokens ({train['documents']:,} documents), val "
          f"{val['tokens']:,} tokens ({val['documents']:,} documents, {share:.2%} of the tokens)"
          f"{''.join(', ' + part for part in _skipped_parts(manifest['skipped']))}", file=sys.stderr, flush=True)


def _check_inputs(files: list[Path], text_field: str, records: RecordOptions, tokenizer: Path | None) -> None:
    """Every input read and checked as prep will read it, before the first write."""
    renderer = _renderer(records, tokenizer)
    for path in files:
        if renderer is None:
            check_file(path, text_field)
        elif sum(example is not None for example in read_examples(path, renderer, records.bad_records == "skip")) == 0:
            raise DataError(f"data: {path}: no chat or prompt/completion record in it")


def prepare(inputs: list[Path], out_dir: Path, vocab_size: int, tokenizer: Path | None = None,
            text_field: str = "text", workers: int = DEFAULT_WORKERS, shard_tokens: int = DEFAULT_SHARD_TOKENS,
            val_fraction: float = 0.02, force: bool = False, records: RecordOptions = RecordOptions()) -> Path:
    """Tokenize inputs into out_dir, or reuse out_dir if it holds an intact result of the same inputs and options."""
    _check_options(vocab_size, workers, shard_tokens, val_fraction, tokenizer is None, records.max_tokens)
    files = find_inputs(inputs)
    out_dir = _check_out_dir(Path(out_dir), files)
    if tokenizer is not None and Path(tokenizer).is_dir():  # a Hugging Face model dir
        tokenizer = Path(tokenizer) / TOKENIZER_FILE
    if tokenizer is not None:
        given_tokenizer(Path(tokenizer), vocab_size)
    options = {"format": FORMAT_VERSION, "vocab_size": vocab_size, "text_field": text_field,
               "shard_tokens": shard_tokens, "val_fraction": val_fraction,
               "tokenizer": file_hash(tokenizer) if tokenizer is not None else None, **asdict(records),
               # its special tokens and chat template change what prep writes
               "tokenizer_config": _beside_hash(tokenizer, TOKENIZER_CONFIG)}
    fp = fingerprint(files, options)
    if not force and _reusable(out_dir, fp):
        print(f"prep: reusing {out_dir} (same inputs and options, shards verified)", file=sys.stderr)
        return out_dir
    _check_inputs(files, text_field, records, tokenizer)
    staging = staging_dir(out_dir, "prep")
    try:
        manifest = _build(files, staging, vocab_size, tokenizer, text_field, records, workers, shard_tokens,
                          val_fraction, fp, options)
        swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _report(out_dir, manifest)
    return out_dir


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread: a BaseException, so that no `except Exception` on the way (a chat
    template's) takes it for an error in the data."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; a DataError prints one line and exits 2."""
    parser = OneLineParser(prog="python -m moe_dist.data.prep", description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, type=Path, help="files, or directories to search")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True, help="the directory to write (replaced whole when done)")
    parser.add_argument("--tokenizer", type=Path,
                        help="use this tokenizer.json (or a Hugging Face model dir's) instead of training one")
    parser.add_argument("--text-field", default="text", help="jsonl field / parquet column holding the text")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    parser.add_argument("--val-fraction", type=float, default=0.02, help="of the tokens, in whole documents")
    parser.add_argument("--force", action="store_true", help="prepare again even if --out holds this result")
    parser.add_argument("--chat", action="store_true",
                        help="the inputs are chat or prompt/completion .jsonl: loss on the answers only")
    parser.add_argument("--max-tokens", type=int, default=0,
                        help="a document's or conversation's most tokens (0: no limit); for --chat, data.seq_len + 1")
    parser.add_argument("--overlong", default="truncate", choices=("truncate", "drop"),
                        help="what to do with a document of more than --max-tokens")
    parser.add_argument("--bad-records", default="error", choices=("error", "skip"),
                        help="a chat record that is not one: stop with one line naming it, or skip and count it")
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        records = RecordOptions(args.chat, args.max_tokens, args.overlong, args.bad_records)
        out = prepare(args.input, args.out, args.vocab_size, args.tokenizer, args.text_field, args.workers,
                      args.shard_tokens, args.val_fraction, args.force, records)
    except (DataError, OSError) as e:
        print(error_line("data", e), file=sys.stderr)
        return 2
    except (_Terminated, KeyboardInterrupt) as e:  # prepare's cleanup has run: the staging dir is gone
        signum = signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT
        print(f"prep: stopped by {signum.name}; nothing half-written was kept", file=sys.stderr)
        return 128 + signum
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
