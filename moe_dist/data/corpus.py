"""The default corpus: this machine's Python standard library source text, prepared once and cached."""

from __future__ import annotations

import fcntl
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from moe_dist.data.manifest import FORMAT_VERSION, MANIFEST
from moe_dist.data.prep import check_vocab_size, given_tokenizer, prepare
from moe_dist.data.tokenizer import file_hash

STDLIB_CAP_BYTES = 16 * 2**20  # keeps tokenizer training + tokenization well under a minute on 2 cores
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})


def stdlib_dir() -> Path:
    """Where this interpreter's standard library lives."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_texts(root: Path, cap_bytes: int) -> Iterator[str]:
    """UTF-8 .py files under root, sorted, outside test and package dirs, until cap_bytes of text."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]  # prune: site-packages can be huge
        paths += [Path(dirpath, name) for name in filenames if name.endswith(".py")]
    total = 0
    for path in sorted(paths):
        data = path.read_bytes()
        if total + len(data) > cap_bytes:
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        total += len(data)
        yield text


def default_corpus(cache_root: Path, vocab_size: int, tokenizer: Path | None = None) -> Path:
    """The prepared stdlib corpus under cache_root/stdlib-f{format}-v{vocab_size}[-t{tokenizer hash}], built on
    first use with its own tokenizer, or with `tokenizer` (a tokenizer.json) when given."""
    cache_root = Path(cache_root)
    suffix = f"-t{file_hash(tokenizer)}" if tokenizer is not None else ""
    target = cache_root / f"stdlib-f{FORMAT_VERSION}-v{vocab_size}{suffix}"
    if (target / MANIFEST).is_file():
        return target
    # What prepare would refuse, refused before the cache is touched: a refusal leaves nothing behind.
    check_vocab_size(vocab_size, tokenizer is None)
    if tokenizer is not None:
        given_tokenizer(tokenizer, vocab_size)
    cache_root.mkdir(parents=True, exist_ok=True)
    # Ranks that start together wait for one builder instead of all building; the lock dies with its process.
    with open(cache_root / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / MANIFEST).is_file():
            return target
        source = cache_root / f".{target.name}-source.jsonl"
        try:
            with open(source, "w", encoding="utf-8") as f:
                for text in stdlib_texts(stdlib_dir(), STDLIB_CAP_BYTES):
                    f.write(json.dumps({"text": text}) + "\n")
            prepare([source], target, vocab_size, tokenizer)  # built beside target and swapped in whole
        finally:
            source.unlink(missing_ok=True)
    return target
