"""Bad input stops the trainer with one line naming the file, key or value, and leaves every file as it was."""

import shutil

import pytest

from moe_dist.data.prep import prepare
from moe_dist.train import main
from runs import tree_state, trainer_args


@pytest.fixture
def run_copy(tmp_path, finished_run):
    """A copy of the finished run (runs dir, run dir) and the argv that made it, pointed at the copy."""
    run_dir, argv = finished_run
    runs = tmp_path / "runs"
    shutil.copytree(run_dir.parent, runs)
    argv = [str(runs) if a == str(run_dir.parent) else a for a in argv]
    return runs, runs / run_dir.name, argv


def assert_refused(capsys, argv, message, *roots):
    capsys.readouterr()  # only what the trainer prints counts
    before = tree_state(*roots)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert tree_state(*roots) == before


def test_missing_data_path(capsys, tmp_path):
    argv = trainer_args(tmp_path / "runs", tmp_path / "nowhere")
    assert_refused(capsys, argv, f"data: {tmp_path / 'nowhere'}: no manifest.json here", tmp_path)
    assert not (tmp_path / "runs").exists()


def test_unreadable_shard(capsys, tmp_path, prepared_data):
    data = tmp_path / "data"
    shutil.copytree(prepared_data, data)
    shard = data / "train-00000.arrow"
    shard.write_bytes(shard.read_bytes()[:100])  # cut short
    assert_refused(capsys, trainer_args(tmp_path / "runs", data), f"data: {shard}: unreadable token shard", tmp_path)


def test_data_of_another_vocabulary(capsys, tmp_path, prepared_data):
    argv = trainer_args(tmp_path / "runs", prepared_data, "--model.vocab_size", "1024")
    assert_refused(capsys, argv, "was prepared for vocab_size 512, but model.vocab_size is 1024", tmp_path,
                   prepared_data)


def test_shards_of_another_tokenizer(capsys, tmp_path, prepared_data):
    data = tmp_path / "data"
    shutil.copytree(prepared_data, data)
    other = tmp_path / "other"
    (tmp_path / "other.txt").write_text("def other(tokenizer):\n    return tokenizer\n" * 300)
    prepare([tmp_path / "other.txt"], other, 512, workers=1, val_fraction=0.2)
    shutil.copyfile(other / "train-00000.arrow", data / "train-00000.arrow")
    assert_refused(capsys, trainer_args(tmp_path / "runs", data),
                   f"data: {data / 'train-00000.arrow'}: built with tokenizer", tmp_path)


def test_resuming_on_data_of_another_tokenizer(capsys, tmp_path, run_copy):
    runs, run_dir, argv = run_copy
    (tmp_path / "other.txt").write_text("class Other:\n    pass\n" * 300)
    other = prepare([tmp_path / "other.txt"], tmp_path / "other", 512, workers=1, val_fraction=0.2)
    argv = [str(other) if a.endswith("out") else a for a in argv]  # --data.path: the prepared_data dir is .../out
    assert_refused(capsys, argv + ["--resume"], f"was tokenized with another tokenizer than {run_dir}/tokenizer.json",
                   tmp_path)


@pytest.mark.parametrize("args,message", [
    (["--model.bogus", "1"], "config: unknown key 'model.bogus' (valid: vocab_size, dim"),
    (["--model.dim", "wide"], "config: model.dim must be int, got 'wide'"),
    (["--model.n_heads", "3"], "config: model.n_heads = 3 must divide model.dim = 128"),
    (["--moe.top_k", "9"], "config: moe.top_k = 9 must be between 1 and moe.num_experts = 8"),
    (["--config", "nope"], "config: no such config 'nope' (known: 3b, small, tiny)"),
    (["--resume", "--overwrite"], "train: --resume and --overwrite exclude each other"),
    (["--bogus"], "train: unknown option '--bogus'"),
])
def test_bad_config(capsys, tmp_path, prepared_data, args, message):
    assert_refused(capsys, trainer_args(tmp_path / "runs", prepared_data, *args), message, tmp_path)
    assert not (tmp_path / "runs").exists()


def test_bad_config_file(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\ndim = 'wide'\n")
    assert_refused(capsys, ["--config", str(bad)], f"config: {bad}: model.dim must be int, got 'wide'", tmp_path)
    bad.write_text("[model]\nwidth = 3\n")
    assert_refused(capsys, ["--config", str(bad)], f"config: {bad}: unknown key 'model.width'", tmp_path)


def test_checkpoint_of_another_model(capsys, run_copy):
    runs, run_dir, argv = run_copy
    assert_refused(capsys, argv + ["--resume", "--model.dim", "96"],
                   f"checkpoint {run_dir}/checkpoints/step-4: model.dim = 64 there, 96 in this config", runs)


def test_world_size_not_matching_the_mesh(capsys, monkeypatch, tmp_path, prepared_data):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node=2 sets it, before any process group
    argv = trainer_args(tmp_path / "runs", prepared_data, "--parallel.ep", "1", "--parallel.dp_shard", "4")
    assert_refused(capsys, argv, "config: parallel.dp_shard = 4 x parallel.ep = 1 must equal the world size 2 "
                                 "(nodes x --nproc_per_node)", tmp_path)


def test_run_dir_holding_a_run_needs_resume_or_overwrite(capsys, monkeypatch, run_copy):
    runs, run_dir, argv = run_copy
    assert_refused(capsys, argv, f"train: {run_dir} already holds a run (config.toml, metrics.jsonl, tokenizer.json, "
                                 f"checkpoints, tensorboard); pass --resume to continue it, --overwrite", runs)
    old_metrics = (run_dir / "metrics.jsonl").read_text()
    assert main(argv + ["--overwrite", "--train.steps", "3", "--metrics.tensorboard", "false"]) == 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-2", "step-3"]
    assert not (run_dir / "tensorboard").exists() and (run_dir / "metrics.jsonl").read_text() != old_metrics
    assert main(argv + ["--resume", "--train.steps", "5"]) == 0
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-5"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a restarted attempt never wipes what the job wrote
    assert main(argv + ["--overwrite", "--train.steps", "6"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-5", "step-6"]
