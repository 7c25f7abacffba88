"""What is safe: atomic swaps, checksums that catch silent corruption, --overwrite that removes only what a run
wrote, resume = "auto" falling back past anything it cannot verify, skipped steps and non-finite weights never
saved."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import moe_dist.train
from distributed import run_on_ranks
from moe_dist import files
from moe_dist.checkpoint import Checkpointer, read_complete, seal, verify
from moe_dist.config import CheckpointConfig
from moe_dist.data import DataError
from moe_dist.data import prep as prep_module
from moe_dist.data.manifest import read_manifest, verify_shards
from moe_dist.data.prep import prepare
from moe_dist.files import file_crc32, swap_in
from runs import SMALL_MODEL, corrupt_in_place, read_metrics, trainer_args, tree_state
from test_train import nan, poison_loss


# --- files ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("exchange", [True, False])
def test_swap_in_replaces_a_directory_whole(tmp_path, monkeypatch, exchange):
    if not exchange:  # a system without renameat2: the old directory is renamed aside first
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    target, staging = tmp_path / "out", tmp_path / ".out.tmp"
    for path, text in ((target, "old"), (staging, "new")):
        path.mkdir()
        (path / "a.txt").write_text(text)
    (target / "only-old.txt").write_text("old")
    swap_in(staging, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"] and (target / "a.txt").read_text() == "new"


# --- prep ------------------------------------------------------------------------------------------------------------

@pytest.fixture
def corpus(tmp_path) -> Path:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(6):
        (inputs / f"{i}.txt").write_text(f"def f{i}(x):\n    return x * {i}\n" * (20 + 10 * i))
    return inputs


def test_a_prep_that_fails_midway_leaves_the_old_result(tmp_path, monkeypatch, corpus):
    out = prepare([corpus], tmp_path / "out", 300, workers=1, shard_tokens=256)
    before = tree_state(tmp_path)
    (corpus / "6.txt").write_text("new input, so the result is rebuilt\n" * 40)
    real = prep_module._tokenize

    def tokenize_then_fail(*args, **kwargs):
        real(*args, **kwargs)  # every shard written, then the disk fills up
        raise OSError(28, "No space left on device", str(out / "manifest.json"))

    monkeypatch.setattr(prep_module, "_tokenize", tokenize_then_fail)
    with pytest.raises(OSError):
        prepare([corpus], out, 300, workers=1, shard_tokens=256)
    (corpus / "6.txt").unlink()
    assert tree_state(tmp_path) == before  # nothing beside it either: the staging dir is gone


def test_prep_reuse_checks_every_shard_and_force_rebuilds(tmp_path, capsys, corpus):
    out = prepare([corpus], tmp_path / "out", 300, workers=1, shard_tokens=256)
    manifest = read_manifest(out)
    assert all(s["crc32"] == file_crc32(out / s["file"]) and s["bytes"] == (out / s["file"]).stat().st_size
               for split in manifest["splits"].values() for s in split["shards"])
    shard = out / manifest["splits"]["train"]["shards"][1]["file"]
    good = shard.read_bytes()
    shard.write_bytes(good[:-9] + b"corrupted")  # same size, other bytes
    with pytest.raises(DataError, match="its CRC-32 is not the manifest's"):
        verify_shards(out, manifest, checksums=True)
    capsys.readouterr()
    prepare([corpus], out, 300, workers=1, shard_tokens=256)
    assert f"{shard}: its CRC-32 is not the manifest's (corrupted)" in capsys.readouterr().err
    assert shard.read_bytes() == good
    verify_shards(out, read_manifest(out), checksums=True)
    prepare([corpus], out, 300, workers=1, shard_tokens=256)
    assert "reusing" in capsys.readouterr().err
    prepare([corpus], out, 300, workers=1, shard_tokens=256, force=True)
    assert "reusing" not in capsys.readouterr().err


# --- the run dir -------------------------------------------------------------------------------------------------

def test_overwrite_removes_only_what_a_run_wrote(capsys, monkeypatch, run_copy):
    runs, run_dir, argv = run_copy
    (run_dir / "notes.txt").write_text("my notes")
    (run_dir / "exports").mkdir()
    old_metrics = (run_dir / "metrics.jsonl").read_text()
    assert moe_dist.train.main(argv + ["--overwrite", "--train.steps", "3", "--metrics.tensorboard", "false"]) == 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-2", "step-3"]
    assert not (run_dir / "tensorboard").exists() and (run_dir / "metrics.jsonl").read_text() != old_metrics
    assert (run_dir / "notes.txt").read_text() == "my notes" and (run_dir / "exports").is_dir()
    assert moe_dist.train.main(argv + ["--resume", "--train.steps", "5"]) == 0
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-5"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a restarted attempt never wipes what the job wrote
    assert moe_dist.train.main(argv + ["--overwrite", "--train.steps", "6"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-5", "step-6"]


# --- checkpoints --------------------------------------------------------------------------------------------------

def test_every_checkpoint_file_has_the_crc_of_its_bytes(finished_run):
    run_dir, _ = finished_run
    for step in ("step-2", "step-4"):
        path = run_dir / "checkpoints" / step
        listed = read_complete(path)["files"]
        assert set(listed) == {p.name for p in path.iterdir()} - {"COMPLETE"}
        for name, record in listed.items():
            assert record == {"bytes": (path / name).stat().st_size, "crc32": file_crc32(path / name)}, name


@pytest.mark.parametrize("damage", ["COMPLETE not JSON", "a shard corrupted in place"])
def test_auto_resume_falls_back_past_what_it_cannot_verify(capsys, run_copy, damage):
    runs, run_dir, argv = run_copy
    step4 = run_dir / "checkpoints" / "step-4"
    if damage == "COMPLETE not JSON":
        (step4 / "COMPLETE").write_text("{half a reco")
    else:
        corrupt_in_place(step4)
    assert moe_dist.train.main(argv + ["--checkpoint.resume", "auto", "--train.steps", "6"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {step4}" in out and "falling back to an older checkpoint" in out
    assert f"resuming from {run_dir / 'checkpoints' / 'step-2'}\n" in out
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-6"


def _verify_on_ranks(rank: int, world_size: int, step: str) -> str | None:
    checkpointer = Checkpointer(Path(step).parent.parent, CheckpointConfig(), rank, world_size)
    return checkpointer.verify_everywhere(Path(step))


@pytest.mark.slow
def test_ranks_share_the_reading_and_agree_on_the_answer(tmp_path, finished_run):
    step = tmp_path / "run" / "checkpoints" / "step-4"
    shutil.copytree(finished_run[0] / "checkpoints" / "step-4", step)
    assert run_on_ranks(_verify_on_ranks, 2, str(step)) == [None, None]
    names = sorted(read_complete(step)["files"])
    odd = step / names[1]  # read by rank 1 only
    odd.write_bytes(bytes(b ^ 0xFF for b in odd.read_bytes()))
    problems = run_on_ranks(_verify_on_ranks, 2, str(step))
    assert problems[0] == problems[1] and f"file {odd} is corrupt" in problems[0]


def test_seal_lists_sizes_and_crcs_and_old_checkpoints_still_verify(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    seal(tmp_path, 1, 1)
    assert json.loads((tmp_path / "COMPLETE").read_text())["files"] == {"a.bin": {"bytes": 3, "crc32": "352441c2"}}
    # COMPLETE as written before checksums: sizes only, still resumable.
    (tmp_path / "COMPLETE").write_text(json.dumps({"step": 1, "world_size": 1, "files": {"a.bin": 3}}))
    verify(tmp_path)


# --- steps that are not saved ------------------------------------------------------------------------------------

def test_a_skipped_last_step_is_not_saved(monkeypatch, capsys, tmp_path, prepared_data):
    poison_loss(monkeypatch, {6}, nan)
    argv = trainer_args(tmp_path, prepared_data, *SMALL_MODEL, "--train.steps", "6", "--checkpoint.interval", "2")
    assert moe_dist.train.main(argv) == 0
    checkpoints = tmp_path / "tiny" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step-4" and not (checkpoints / "step-6").exists()
    assert f"step 6 was not saved (its update was skipped or its weights are not finite); the last good checkpoint " \
           f"is {checkpoints / 'step-4'}" in capsys.readouterr().err


def test_non_finite_weights_are_never_saved(monkeypatch, capsys, tmp_path, prepared_data):
    real_step, calls = torch.optim.AdamW.step, []

    def step_then_poison(self, *args, **kwargs):  # an update that leaves NaN weights behind a finite loss
        result = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_poison)
    argv = trainer_args(tmp_path, prepared_data, *SMALL_MODEL, "--train.steps", "8", "--checkpoint.interval", "1",
                        "--train.max_nonfinite_steps", "2")
    assert moe_dist.train.main(argv) == 1
    checkpoints = tmp_path / "tiny" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-1", "step-2"]
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.endswith(f"the last good checkpoint is {checkpoints / 'step-2'}")
    assert [r["skipped"] for r in read_metrics(tmp_path / "tiny") if r["kind"] == "train"] == [False] * 3 + [True] * 2
