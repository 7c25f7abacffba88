"""manifest.json of a prepared data dir: what it holds, each shard's size and CRC-32, checked before use."""

from __future__ import annotations

import json
from pathlib import Path

from moe_dist.data import DataError, one_line
from moe_dist.files import file_crc32

MANIFEST = "manifest.json"
FORMAT_VERSION = 4  # 3: each shard's size and CRC-32; the val split is cut by tokens; 4: token flags, chat kind
SHARD_TOKENIZER_KEY = b"moe_dist.tokenizer_hash"
SPLITS = ("train", "val")
TOKEN_DTYPES = ("uint16", "uint32")
PREPARE_AGAIN = "prepare it again (python -m moe_dist.data.prep ... --force)"


def _field(obj: object, key: str, kind: type, where: str, path: Path) -> object:
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise DataError(f"data: {path}: {where}{key} is missing or not {kind.__name__}; {PREPARE_AGAIN}")
    return value


def _plain_file(obj: dict, where: str, path: Path) -> str:
    """A file name inside the data dir: a manifest never points outside it."""
    name = _field(obj, "file", str, where, path)
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise DataError(f"data: {path}: {where}file = {name!r} is not a file name in this directory; {PREPARE_AGAIN}")
    return name


def _check(manifest: object, path: Path) -> dict:
    """The manifest if its structure is what prep writes; DataError naming the first bad key otherwise."""
    if not isinstance(manifest, dict):
        raise DataError(f"data: {path}: not a manifest (a JSON object was expected); {PREPARE_AGAIN}")
    version = manifest.get("format")
    if version != FORMAT_VERSION:
        raise DataError(f"data: {path}: prepared by another moe_dist version (format {version!r}, this one reads "
                        f"{FORMAT_VERSION}); {PREPARE_AGAIN}")
    _plain_file(_field(manifest, "tokenizer", dict, "", path), "tokenizer.", path)
    _field(manifest["tokenizer"], "hash", str, "tokenizer.", path)
    for key in ("vocab_size", "eos_id"):
        _field(manifest, key, int, "", path)
    if manifest.get("dtype") not in TOKEN_DTYPES:
        raise DataError(f"data: {path}: dtype = {manifest.get('dtype')!r} is not one of {', '.join(TOKEN_DTYPES)}; "
                        f"{PREPARE_AGAIN}")
    splits = _field(manifest, "splits", dict, "", path)
    for split in SPLITS:
        _field(splits, split, dict, "splits.", path)
        for key in ("tokens", "documents"):
            _field(splits[split], key, int, f"splits.{split}.", path)
        for i, shard in enumerate(_field(splits[split], "shards", list, f"splits.{split}.", path)):
            where = f"splits.{split}.shards[{i}]."
            _plain_file(shard, where, path)
            for key in ("tokens", "bytes"):
                _field(shard, key, int, where, path)
            _field(shard, "crc32", str, where, path)
    return manifest


def read_manifest(data_dir: Path) -> dict:
    """The checked manifest of a prepared directory; DataError naming the directory or the bad key."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"data: {data_dir}: no {MANIFEST} here; prepare it with python -m moe_dist.data.prep")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise DataError(f"data: {path}: unreadable ({one_line(e)}); {PREPARE_AGAIN}") from None
    return _check(manifest, path)


def write_manifest(data_dir: Path, manifest: dict) -> None:
    (Path(data_dir) / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def shard_record(path: Path, tokens: int) -> dict:
    """What the manifest says of one written shard."""
    return {"file": path.name, "tokens": tokens, "bytes": path.stat().st_size, "crc32": file_crc32(path)}


def verify_shards(data_dir: Path, manifest: dict, checksums: bool, splits: tuple[str, ...] = SPLITS) -> None:
    """DataError naming the first shard that is missing, of another size or (with checksums) another content.

    Sizes cost a stat per shard and are checked on every load; checksums read every byte and are checked
    when prep is asked to reuse a directory.
    """
    for split in splits:
        for shard in manifest["splits"][split]["shards"]:
            path = Path(data_dir) / shard["file"]
            if not path.is_file():
                raise DataError(f"data: {path}: missing (the manifest names it); {PREPARE_AGAIN}")
            size = path.stat().st_size
            if size != shard["bytes"]:
                raise DataError(f"data: {path}: {size} bytes, the manifest says {shard['bytes']} (truncated or "
                                f"replaced); {PREPARE_AGAIN}")
            if checksums and file_crc32(path) != shard["crc32"]:
                raise DataError(f"data: {path}: its CRC-32 is not the manifest's (corrupted); {PREPARE_AGAIN}")
