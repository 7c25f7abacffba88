"""Processes end with whoever started them: a rank never outlives its torchrun, torchrun never its launcher.

torchrun starts each rank in a session of its own, so neither a `kill -9` of the launcher's process group nor
one of torchrun itself reaches the ranks: they would train on, saving checkpoints, with nobody left to stop
them. Each process we start therefore watches its own parent and goes when it goes: a rank under torchrun
(moe_dist.train), and torchrun under the launcher (moe_dist.agent).
"""

from __future__ import annotations

import os
import signal
import threading
import time

POLL_S = 0.5
PARENT_PID = "MOE_DIST_PARENT_PID"  # set by a parent for its children: the PID they must outlive no longer


def exit_with_parent(poll_s: float = POLL_S) -> None:
    """SIGKILL this process, from a daemon thread, once its parent has died.

    A dead parent's children are handed to init (or a subreaper), so getppid() changes. The parent is the one
    PARENT_PID names where it is set: a parent that died while this process was still importing has already
    been replaced by then. Polling, not PR_SET_PDEATHSIG: that signal fires when the *thread* that forked us
    exits, and an agent may start its workers from any thread. SIGKILL, not a clean exit: whatever started the
    run is gone and nobody waits for a final checkpoint; a save in flight stays a .tmp directory, never
    `latest`, as after any kill.
    """
    parent = int(os.environ.get(PARENT_PID) or os.getppid())

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def end_children_with_this_process(env: dict[str, str]) -> dict[str, str]:
    """`env` for a child that calls exit_with_parent: it ends with this process, even if this one dies first."""
    return {**env, PARENT_PID: str(os.getpid())}
