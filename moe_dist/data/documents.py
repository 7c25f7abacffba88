"""Input documents: find the files, check them whole before anything is written, then stream them.

A `.txt` file is one document, a `.jsonl` line one document (its `text` field), a `.parquet` row one
document (its `text` column, read in record batches as Hugging Face datasets ship them).
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from moe_dist.data import DataError, one_line

SUFFIXES = (".txt", ".jsonl", ".parquet")
PARQUET_BATCH_ROWS = 1024
TEXT_CHUNK_BYTES = 1 << 20


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


def _decode(data: bytes, where: str, offset: int = 0) -> str:
    """UTF-8 text without NUL bytes (a NUL means a binary file given as text)."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise DataError(f"data: {where}: binary data (a NUL byte at byte {offset + nul}), not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data: {where}: not UTF-8 text ({e.reason} at byte {offset + e.start})") from None


def unicode_text(text: str, where: str, what: str) -> str:
    """`text` if it is Unicode text: JSON can escape a lone surrogate ("\\ud800"), which UTF-8 cannot hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"data: {where}: {what} holds a lone surrogate (\\u{ord(text[e.start]):04x} at character "
                        f"{e.start}), which is not text") from None
    return text


def _jsonl_text(line: bytes, where: str, text_field: str) -> str:
    try:
        record = json.loads(_decode(line, where))
    except ValueError as e:
        raise DataError(f"data: {where}: not valid JSON ({one_line(e)})") from None
    if not isinstance(record, dict) or text_field not in record:
        raise DataError(f"data: {where}: no {text_field!r} field")
    text = record[text_field]
    if not isinstance(text, (str, type(None))):
        raise DataError(f"data: {where}: field {text_field!r} is {type(text).__name__}, not str")
    return unicode_text(text or "", where, f"field {text_field!r}")


def read_documents(path: Path, text_field: str) -> Iterator[str]:
    """Stream one file's documents (null or missing text reads as "")."""
    if path.suffix == ".txt":
        yield _decode(path.read_bytes(), str(path))
    elif path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield _jsonl_text(line, f"{path}:{lineno}", text_field)
    else:
        parquet = _parquet_file(path, text_field)
        try:
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
                for text in batch.column(0).to_pylist():
                    yield text or ""
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"data: {path}: unreadable parquet data ({one_line(e)})") from None


def _check_text_file(path: Path) -> None:
    """UTF-8 without NUL bytes, read in chunks: a text file may be larger than memory."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while chunk := f.read(TEXT_CHUNK_BYTES):
            if (nul := chunk.find(b"\0")) >= 0:
                raise DataError(f"data: {path}: binary data (a NUL byte at byte {offset + nul}), not text")
            carried = len(decoder.getstate()[0])  # bytes of a sequence the last chunk cut in two
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise DataError(f"data: {path}: not UTF-8 text ({e.reason} at byte {offset - carried + e.start})"
                                ) from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise DataError(f"data: {path}: not UTF-8 text ({e.reason} at the end)") from None


def check_file(path: Path, text_field: str) -> int:
    """Read one file whole as prep will, without keeping it: its document count, or DataError naming the
    file (and line) that prep would fail on. Runs before prep writes anything."""
    if path.stat().st_size == 0:
        raise DataError(f"data: {path}: empty file")
    if path.suffix == ".txt":
        _check_text_file(path)
        return 1
    if path.suffix == ".parquet":
        count = _parquet_file(path, text_field).metadata.num_rows
    else:
        count = sum(1 for _ in read_documents(path, text_field))
    if count == 0:
        raise DataError(f"data: {path}: empty file (no documents)")
    return count
