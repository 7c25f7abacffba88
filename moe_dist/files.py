"""Writing so that a crash or a refused input never loses the last good copy: atomic swaps, checksums.

Everything moe_dist writes that a user keeps (prepared data, checkpoints, exports) is built beside
its final place under a hidden temporary name and swapped in by one rename when complete.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import zlib
from pathlib import Path

CHUNK_BYTES = 1 << 24

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


class WriteError(RuntimeError):
    """The filesystem refused a write (full, over quota, read-only, ...): one line naming the path."""


def refused_write(program: str, error: OSError, path: Path | str | None = None) -> str:
    """The one line for an OSError raised while writing `path` (an error's own file name wins)."""
    where = error.filename or path
    return f"{program}: cannot write {where}: {error.strerror or error}"


def file_crc32(path: Path) -> str:
    """The CRC-32 of a file's bytes as 8 hex digits: catches torn, truncated and overwritten files.

    CRC-32 rather than a cryptographic hash: it runs at several GB/s (zlib, without the GIL), which keeps
    it a small fraction of a checkpoint's save time; it guards against accidents, not attackers.
    """
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename: readers see the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:  # a full disk: the old file stays, and no half-written temporary beside it
        tmp.unlink(missing_ok=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries in one step (Linux renameat2); False where the system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # an old kernel or a filesystem without it
        return False
    raise OSError(code, os.strerror(code), str(b))


def swap_in(staging: Path, target: Path) -> None:
    """Put the complete directory `staging` at `target`, replacing what was there in one step.

    The old content is deleted only after the new one is in place. Where the system has no atomic
    exchange, the old directory is first renamed aside: a crash between the two renames leaves it
    whole under `.<name>.old`, never half-deleted.
    """
    if not target.exists():
        os.rename(staging, target)
        return
    if not _exchange(staging, target):
        aside = target.with_name(f".{target.name}.old")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(target, aside)
        os.rename(staging, target)
        staging = aside
    shutil.rmtree(staging)


def staging_dir(target: Path, purpose: str) -> Path:
    """A fresh hidden directory beside `target` (same filesystem, so the final rename is atomic)."""
    staging = target.with_name(f".{target.name}.{purpose}-tmp")
    if staging.exists():  # left by a run that was killed while building
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def default_file_mode() -> int:
    """The mode a new file gets under this process's umask (for files a library wrote more privately)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def nearest_existing(path: Path) -> Path:
    """`path` itself or its closest ancestor that exists."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def unwritable_reason(path: Path) -> str | None:
    """Why a directory could not be created or written at `path`, as a phrase; None when it can."""
    existing = nearest_existing(path)
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None
