"""One writer per run dir: a live run refuses a second trainer, --overwrite and an export into it; a killed
holder never leaves a lock behind."""

import os
import signal
import subprocess
import sys

import pytest

import moe_dist.train
from moe_dist.checkpoint import latest_checkpoint
from moe_dist.export import main as export_main
from moe_dist.run_lock import LOCK_FILE, RunInUseError, RunLock, live_holder
from runs import REPO, SMALL_MODEL, start_trainer, train_losses, trainer_args, trainer_command, tree_state, wait_for

HOLD = "import sys, time; from pathlib import Path; from moe_dist.run_lock import RunLock; " \
       "lock = RunLock(Path(sys.argv[1]), 'test'); print('held', flush=True); time.sleep(600)"
# What the live run itself writes and deletes meanwhile: its metrics and checkpoints, never read.
LIVE_FILES = ("metrics", "checkpoints")


def hold_in_another_process(run_dir) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    assert live_holder(tmp_path) is None  # no lock file: nobody
    holder = hold_in_another_process(tmp_path)
    try:
        assert f"PID {holder.pid}, since " in live_holder(tmp_path)
        with pytest.raises(RunInUseError, match=f"{tmp_path} is in use by another process .*PID {holder.pid}"):
            RunLock(tmp_path, "train")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert live_holder(tmp_path) is None  # released by the kernel: no stale lock
    lock = RunLock(tmp_path, "train")
    assert f"PID {os.getpid()}" in live_holder(tmp_path)
    lock.close()
    assert live_holder(tmp_path) is None


def test_the_lock_file_is_never_followed_out_of_the_run_dir(tmp_path):
    outside = tmp_path / "outside"
    outside.write_text("keep")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).symlink_to(outside)
    with pytest.raises(OSError):
        RunLock(tmp_path / "run", "train")
    assert outside.read_text() == "keep"


@pytest.mark.slow
def test_a_live_run_has_one_writer(tmp_path, prepared_data, capsys):
    argv = trainer_args(tmp_path, prepared_data, *SMALL_MODEL, "--train.steps", "100000", "--train.eval_interval",
                        "0", "--checkpoint.interval", "2")
    live = start_trainer(trainer_command() + argv)
    run_dir = tmp_path / "tiny"
    try:
        wait_for(lambda: len(train_losses(run_dir)) >= 3, live)
        before = tree_state(run_dir, ignore=LIVE_FILES)
        for option in ("--resume", "--overwrite"):
            assert moe_dist.train.main([*argv, option]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"{run_dir} is in use by another process (host " in err, err
            assert f"PID {live.pid}, since " in err
        assert export_main([str(run_dir), "--out", str(run_dir / "hf"), "--format", "hf"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"export: {run_dir} is in use by another process" in err, err
        assert not (run_dir / "hf").exists()
        after = tree_state(run_dir, ignore=LIVE_FILES)
        assert after == before
        assert live.poll() is None  # untouched by the refused attempts
    finally:
        live.kill()
        live.communicate()
    # kill -9 leaves no stale lock: the run resumes at once.
    step = int(latest_checkpoint(run_dir / "checkpoints").name.split("-")[1])
    assert moe_dist.train.main([*argv, "--resume", "--train.stop_after", str(step + 1)]) == 0, capsys.readouterr()
