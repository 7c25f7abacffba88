"""One writer per run dir: an exclusive flock on <run dir>/moe_dist-run.lock, held for the whole run.

The lock belongs to an open file, so the kernel releases it whenever its holder ends, a crash or a kill -9
included: no stale lock ever blocks a restart, and nothing has to clean it up. The file itself stays (removing
a lock file while another process waits on it would let two holders in); it records who holds it, for the
refusal's message. Rank 0 holds it; every rank and the launchers' preflight first check that nobody else does.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from moe_dist.parallel.agreement import first_problem

LOCK_FILE = "moe_dist-run.lock"
# Filesystems that cannot lock (a Lustre mount without -o flock answers ENOSYS): the run goes on unguarded.
_NO_LOCKS = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP)
_RETRIES = 40  # x 25 ms: another process's check holds a shared lock for a moment


class RunInUseError(RuntimeError):
    """The run dir has a live writer; the message names it (host, PID, since when)."""


def _holder(fd: int) -> str:
    try:
        held = json.loads(os.pread(fd, 4096, 0))
        return f"host {held['host']}, PID {held['pid']}, since {held['since']}"
    except (ValueError, KeyError, TypeError, OSError):  # the holder has not written its name yet
        return "a process that has not yet said who it is"


def live_holder(run_dir: Path) -> str | None:
    """Who holds run_dir's lock, or None when nobody does (or the filesystem cannot tell)."""
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:  # no lock file (no run yet), or a link we do not follow
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return _holder(fd)
    except OSError as e:
        if e.errno in _NO_LOCKS:
            return None
        raise
    finally:
        os.close(fd)


class RunLock:
    """This process's hold on a run dir: released by close(), by garbage collection, or by the OS at exit."""

    def __init__(self, run_dir: Path, program: str):
        self.fd: int | None = None
        self.fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            self._take(run_dir, program)
        except BaseException:
            self.close()
            raise

    def _take(self, run_dir: Path, program: str) -> None:
        for _ in range(_RETRIES):
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.025)
            except OSError as e:
                if e.errno not in _NO_LOCKS:
                    raise
                print(f"{program}: warning: {run_dir} is on a filesystem without file locks "
                      f"({os.strerror(e.errno)}); nothing stops a second writer", flush=True)
                return
        else:
            raise RunInUseError(in_use_message(program, run_dir, _holder(self.fd)))
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": since}).encode(), 0)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        self.close()


def in_use_message(program: str, run_dir: Path, holder: str) -> str:
    return (f"{program}: {run_dir} is in use by another process ({holder}); a run dir has one writer at a time: "
            f"wait for it to end, or choose another name")


def refuse_if_live(program: str, run_dir: Path) -> None:
    """RunInUseError naming the holder when a live process writes to run_dir; on every rank alike when called by
    every rank (a writer may start between two ranks' looks)."""
    holder = first_problem(live_holder(run_dir))
    if holder is not None:
        raise RunInUseError(in_use_message(program, run_dir, holder))
