"""A filesystem that refuses writes, as a full disk does: one line naming the path, every rank stops together,
temporaries removed, the last good checkpoint still `latest`.

No root needed: RLIMIT_FSIZE makes the kernel refuse every write past a file size (EFBIG, since Python ignores
SIGXFSZ), through the same write calls that ENOSPC, EDQUOT and EROFS fail in.
"""

import errno
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import moe_dist.checkpoint
from moe_dist import export
from moe_dist.checkpoint import Checkpointer, latest_checkpoint, verify
from moe_dist.config import CheckpointConfig
from moe_dist.files import WriteError
from distributed import in_fresh_process, run_on_ranks
from runs import SMALL_MODEL, local_sh, train_on_ranks, trainer_args

LIMIT = 64 << 10  # above config.toml, tokenizer.json and the RNG files; below every checkpoint shard


def save_on_a_full_disk(rank: int, world_size: int, run_dir: str, failing_rank: int, where: str) -> str:
    """Save step 1, then step 2 with `failing_rank`'s write of `where` refused for lack of space; the error line."""
    run_dir = Path(run_dir)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    checkpointer = Checkpointer(run_dir, CheckpointConfig(), rank, world_size)
    checkpointer.save(1, model, optimizer, scheduler, {"step": 1})

    class FullFile:  # what open() gives on a full disk: the file opens, its write fails
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> bool:
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if rank == failing_rank and where == "rng":
        moe_dist.checkpoint.open = FullFile  # the module's open, not the builtin
    elif rank == failing_rank:
        moe_dist.checkpoint._Crc32Stream.write = FullFile.write
    try:
        checkpointer.save(2, model, optimizer, scheduler, {"step": 2})
    except WriteError as e:
        return str(e)
    return "saved"


@pytest.mark.parametrize("failing_rank, where", [(1, "rng"), (0, "shards")])
def test_no_space_for_one_ranks_file_stops_both_ranks(tmp_path, failing_rank, where):
    (tmp_path / "config.toml").write_text("")  # what the trainer writes first, copied into each checkpoint
    lines = run_on_ranks(save_on_a_full_disk, 2, str(tmp_path), failing_rank, where)
    checkpoints = tmp_path / "checkpoints"
    failed = f"{checkpoints}/.step-2.tmp/" + ("rng-rank1.pt" if where == "rng" else "__0_0.distcp")
    assert lines == [f"train: cannot write {failed}: No space left on device; checkpoint step-2 was not saved, the "
                     f"latest is {checkpoints}/step-1"] * 2
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-1"]
    verify(latest_checkpoint(checkpoints))


def limit_file_size(limit: int = LIMIT):
    """A preexec_fn: every write past `limit` bytes of a file is refused."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.slow
def test_a_full_disk_stops_every_rank_and_keeps_the_last_checkpoint(tmp_path, prepared_data):
    # Through launch/local.sh, as a user runs it: the ranks' one line is all of stderr. The good checkpoint before
    # comes from two forked ranks: a launch through local.sh costs some 20 s here.
    args = trainer_args(tmp_path, prepared_data, *SMALL_MODEL, "--train.eval_interval", "0", "--checkpoint.interval",
                        "2", "--parallel.ep", "2")
    first = train_on_ranks([*args, "--train.steps", "2"], 2)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = tmp_path / "tiny" / "checkpoints"
    good = latest_checkpoint(checkpoints)

    # The step-4 checkpoint's shards cannot be written.
    full = local_sh(*args, "--resume", "--train.steps", "6", preexec_fn=limit_file_size())
    err = full.communicate(timeout=600)[1]
    assert full.returncode == 1
    assert err == (f"train: cannot write {checkpoints}/.step-4.tmp/__0_0.distcp: File too large; checkpoint step-4 "
                   f"was not saved, the latest is {good}\n")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-2"]  # no .step-4.tmp
    assert latest_checkpoint(checkpoints) == good
    verify(good)

    # metrics.jsonl cannot grow: rank 0 alone writes it, and every rank stops at the next step.
    metrics = tmp_path / "tiny" / "metrics.jsonl"
    filler = json.dumps({"kind": "filler"}) + "\n"
    with open(metrics, "a") as f:
        f.write(filler * ((LIMIT - metrics.stat().st_size) // len(filler)))
        f.write("\n" * (LIMIT - f.tell()))
    stuck = local_sh(*args, "--resume", "--train.steps", "6", "--checkpoint.interval", "0",
                     preexec_fn=limit_file_size())
    err = stuck.communicate(timeout=600)[1]
    assert stuck.returncode == 1
    assert err == f"train: cannot write {metrics}: File too large\n"
    assert latest_checkpoint(checkpoints) == good


def export_on_a_full_disk(argv: list[str]) -> tuple[int, str]:
    """python -m moe_dist.export's main (in a fresh process: the limit stays) with every write past LIMIT bytes of a
    file refused: its exit code and all it wrote to stderr, the file descriptor, not only sys.stderr."""
    with tempfile.TemporaryFile("w+") as err:
        os.dup2(err.fileno(), 2)
        limit_file_size()()
        code = export.main(argv)
        sys.stderr.flush()
        err.seek(0)
        return code, err.read()


def test_an_export_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, finished_run):
    run_dir, _ = finished_run
    code, err = in_fresh_process(export_on_a_full_disk, [str(run_dir), "--out", str(tmp_path / "out")])
    assert code == 2
    assert err.startswith(f"export: cannot write {tmp_path}/.out.export-tmp/model.safetensors: ")
    assert err.count("\n") == 1 and err.endswith("; nothing was exported\n"), err
    assert list(tmp_path.iterdir()) == []
