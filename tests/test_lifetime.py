"""A process started by ours ends with its parent, even one that died before the child started watching."""

import os
import signal
import subprocess
import sys

import pytest

from runs import REPO

WATCH = "from moe_dist.lifetime import exit_with_parent; exit_with_parent(0.05); import time; time.sleep(60)"


def test_a_child_whose_parent_died_while_it_started_ends_at_once():
    gone = subprocess.Popen(["true"])
    gone.wait()  # its PID names no live parent now: the child was, as it were, orphaned while importing
    child = subprocess.Popen([sys.executable, "-c", WATCH], cwd=REPO,
                             env={**os.environ, "MOE_DIST_PARENT_PID": str(gone.pid)})
    assert child.wait(timeout=20) == -signal.SIGKILL


def test_a_child_whose_parent_lives_keeps_running():
    child = subprocess.Popen([sys.executable, "-c", WATCH], cwd=REPO,
                             env={**os.environ, "MOE_DIST_PARENT_PID": str(os.getpid())})
    try:
        with pytest.raises(subprocess.TimeoutExpired):  # still running with its parent
            child.wait(timeout=1)
    finally:
        child.kill()
        child.wait()
