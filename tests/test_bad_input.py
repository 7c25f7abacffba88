"""The bad-input matrix: every program refuses with exit code 2 and exactly one line on stderr naming the file,
key or value, and leaves every file under the data dir, the run dir and any other path involved as it was
(content hashes before and after)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe_dist import export, generate, launch, params, train
from moe_dist.data import prep
from moe_dist.data.tokenizer import train_tokenizer
from runs import corrupt_in_place, tree_state, trainer_args
from test_data import arange_data


def exit_code(program: Callable, argv: list[str]) -> int:
    try:
        return program(argv)
    except SystemExit as e:  # argparse errors
        return e.code


def assert_refused(capsys, program: Callable, argv: list[str], message: str | list[str], *roots: Path) -> None:
    """program(argv) exits 2 with one line on stderr holding `message` (each of them), and no file under
    `roots` changes."""
    capsys.readouterr()  # only what the program prints counts
    before = tree_state(*roots)
    assert exit_code(program, argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    for needle in [message] if isinstance(message, str) else message:
        assert needle in err, err
    assert tree_state(*roots) == before


@pytest.fixture
def data_copy(tmp_path, prepared_data):
    return Path(shutil.copytree(prepared_data, tmp_path / "data"))


# --- the trainer's configuration: refused before anything is read or written --------------------------------

CONFIG_CASES = [
    (["--model.bogus", "1"], "config: unknown key 'model.bogus' (valid: vocab_size, dim"),
    (["--bogus.dim", "1"], "config: unknown section in 'bogus.dim'"),
    (["--model.dim", "wide"], "config: model.dim must be int, got 'wide'"),
    (["--moe.renormalize", "maybe"], "config: moe.renormalize must be bool"),
    (["--model.n_heads", "3"], "config: model.n_heads = 3 must divide model.dim = 128"),
    (["--moe.top_k", "9"], "config: moe.top_k = 9 must be between 1 and moe.num_experts = 8"),
    (["--moe.n_group", "3"], "config: moe.n_group = 3 must divide moe.num_experts = 8"),
    (["--moe.n_group", "2", "--moe.topk_group", "3"],
     "config: moe.topk_group = 3 must be between 1 and moe.n_group = 2"),
    (["--moe.n_group", "8", "--moe.topk_group", "1"],
     "config: moe.top_k = 2 must be at most the experts in moe.topk_group = 1 groups (1)"),
    (["--moe.routed_scaling_factor", "0"], "config: moe.routed_scaling_factor = 0"),
    (["--moe.score_func", "relu"], "config: moe.score_func = 'relu' is not one of 'softmax', 'sigmoid'"),
    (["--config", "nope"], "config: no such config 'nope' (known: 3b, small, tiny)"),
    (["--resume", "--overwrite"], "train: --resume and --overwrite exclude each other"),
    (["--bogus"], "train: unknown option '--bogus'"),
    (["--model.dim"], "train: --model.dim needs a value"),
    (["--optim.lr", "inf"], "config: optim.lr = inf must be finite and in (0, 1]"),
    (["--optim.lr", "0"], "config: optim.lr = 0.0 must be in (0, 1]"),
    (["--optim.weight_decay", "nan"], "config: optim.weight_decay = nan must be finite and >= 0"),
    (["--optim.beta1", "1.0"], "config: optim.beta1 = 1.0 must be in [0, 1)"),
    (["--optim.beta2", "nan"], "config: optim.beta2 = nan must be finite and in [0, 1)"),
    (["--optim.min_lr_ratio", "1.5"], "config: optim.min_lr_ratio = 1.5 must be in [0, 1]"),
    (["--optim.eps", "0"], "config: optim.eps = 0.0 must be > 0"),
    (["--optim.grad_clip", "-1"], "config: optim.grad_clip = -1.0 must be >= 0"),
    (["--optim.warmup_steps", "-1"], "config: optim.warmup_steps = -1 must be >= 0"),
    (["--train.eval_steps", "0"], "config: train.eval_steps = 0 must be >= 1"),
    (["--train.stop_after", "-1"], "config: train.stop_after = -1 must be >= 0"),
    (["--train.seed", "-1"], "config: train.seed = -1 must be >= 0"),
    (["--train.seed", str(2**64)], f"config: train.seed = {2**64} must be at most"),
    (["--data.seed", "-5"], "config: data.seed = -5 must be >= 0"),
    (["--checkpoint.interval", "-1"], "config: checkpoint.interval = -1 must be >= 0"),
    (["--checkpoint.keep_last", "0"], "config: checkpoint.keep_last = 0 must be >= 1"),
    (["--checkpoint.resume", "always"], "config: checkpoint.resume = 'always' is not one of '', 'auto'"),
    (["--moe.aux_loss_coef", "nan"], "config: moe.aux_loss_coef = nan must be finite and >= 0"),
    (["--moe.capacity_factor", "inf"], "config: moe.capacity_factor = inf must be finite and >= 0"),
    (["--model.rope_theta", "-1"], "config: model.rope_theta = -1.0 must be > 0"),
    (["--model.init_std", "nan"], "config: model.init_std = nan must be finite and > 0"),
    (["--data.val_fraction", "1.5"], "config: data.val_fraction = 1.5 must be in [0, 1)"),
    (["--parallel.dp_shard", "0"], "config: parallel.dp_shard = 0 must be -1 (the rest) or >= 1"),
    (["--parallel.ep", "3"], "config: parallel.ep = 3 must divide moe.num_experts = 8"),
    (["--data.seq_len", "4096"], "config: data.seq_len = 4096 exceeds model.max_seq_len = 128"),
    (["--train.name", "../../victim"], "config: train.name = '../../victim' must be a plain name"),
    (["--train.name", "/etc"], "config: train.name = '/etc' must be a plain name"),
    (["--train.name", ""], "config: train.name = '' must be a plain name"),
    (["--train.name", "-x"], "config: train.name = '-x' must be a plain name"),
    (["--train.name", "_corpus"], "config: train.name = '_corpus' must be a plain name"),
    (["--data.mixture", "web=3"], "config: data.path and data.mixture exclude each other"),
    (["--data.path", "", "--data.mixture", "web=0"], "config: data.mixture[0].weight = 0.0 must be finite and > 0"),
    (["--optim.schedule", "step"], "config: optim.schedule = 'step' is not one of 'cosine', 'wsd', 'linear'"),
    (["--optim.schedule", "wsd", "--optim.decay_steps", "95"],
     "config: optim.decay_steps = 95 must fit in train.steps = 100 after optim.warmup_steps = 10"),
    (["--train.upcycle_noise", "0.1"], "config: train.upcycle_noise = 0.1 applies only to upcycling"),
]


@pytest.mark.parametrize("args, message", CONFIG_CASES)
def test_trainer_config(capsys, tmp_path, prepared_data, args, message):
    argv = trainer_args(tmp_path / "runs", prepared_data, *args)
    assert_refused(capsys, train.main, argv, message, tmp_path, prepared_data)
    assert not (tmp_path / "runs").exists()


def test_trainer_config_file(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\ndim = 'wide'\n")
    assert_refused(capsys, train.main, ["--config", str(bad)], f"config: {bad}: model.dim must be int", tmp_path)
    bad.write_text("[model]\nwidth = 3\n")
    assert_refused(capsys, train.main, ["--config", str(bad)], f"config: {bad}: unknown key 'model.width'", tmp_path)
    bad.write_text("[model\n")
    assert_refused(capsys, train.main, ["--config", str(bad)], f"config: {bad}: ", tmp_path)


def test_a_mixture_of_two_tokenizers(capsys, tmp_path, prepared_data):
    other = arange_data(tmp_path / "other", 30_000, shard_tokens=10_000, vocab_size=512, tokenizer='{"other": 1}')
    argv = trainer_args(tmp_path / "runs", None, "--model.vocab_size", "512", "--data.mixture",
                        f"{prepared_data}=1,{other}=1")
    assert_refused(capsys, train.main, argv, f"data: {other}/manifest.json: tokenized with tokenizer", tmp_path,
                   prepared_data)


def test_world_size_not_matching_the_mesh(capsys, monkeypatch, tmp_path, prepared_data):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node=2 sets it, before any process group
    argv = trainer_args(tmp_path / "runs", prepared_data, "--parallel.ep", "1", "--parallel.dp_shard", "4")
    assert_refused(capsys, train.main, argv, "config: parallel.dp_shard = 4 x parallel.ep = 1 must equal the world "
                                             "size 2 (nodes x --nproc_per_node)", tmp_path, prepared_data)


# --- the data the trainer is given: checked before the run dir is written --------------------------------------

def _edit_manifest(data: Path, edit: Callable[[dict], object]) -> None:
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps(edit(manifest)))


def _cut_shard(data: Path) -> None:
    shard = data / "train-00000.arrow"
    shard.write_bytes(shard.read_bytes()[:100])


def _other_tokenizers_shard(data: Path) -> None:
    """A shard of the same size, written with another tokenizer."""
    shard = data / "val-00000.arrow"
    size = shard.stat().st_size
    blob = shard.read_bytes()
    digest = json.loads((data / "manifest.json").read_text())["tokenizer"]["hash"].encode()
    shard.write_bytes(blob.replace(digest, b"0123456789abcdef"))
    assert shard.stat().st_size == size


def _old_format(manifest: dict) -> dict:
    return {**manifest, "format": 2}


def _shard_outside(manifest: dict) -> dict:
    manifest["splits"]["train"]["shards"][0]["file"] = "../../etc/passwd"
    return manifest


DATA_CASES = [
    (lambda d: (d / "manifest.json").write_text("{}"), [], "manifest.json: prepared by another moe_dist version"),
    (lambda d: (d / "manifest.json").write_text("[]"), [], "manifest.json: not a manifest (a JSON object"),
    (lambda d: (d / "manifest.json").write_text("{not json"), [], "manifest.json: unreadable"),
    (lambda d: _edit_manifest(d, _old_format), [], "prepared by another moe_dist version (format 2"),
    (lambda d: _edit_manifest(d, lambda m: {**m, "dtype": "int8"}), [], "dtype = 'int8' is not one of"),
    (lambda d: _edit_manifest(d, lambda m: {**m, "vocab_size": "512"}), [], "manifest.json: vocab_size is missing"),
    (lambda d: _edit_manifest(d, _shard_outside), [], "file = '../../etc/passwd' is not a file name in this dir"),
    (lambda d: (d / "manifest.json").unlink(), [], "{data}: no manifest.json here"),
    (lambda d: (d / "val-00000.arrow").unlink(), [], "val-00000.arrow: missing (the manifest names it)"),
    (_cut_shard, [], "train-00000.arrow: 100 bytes, the manifest says"),
    (_other_tokenizers_shard, [], "val-00000.arrow: built with tokenizer 0123456789abcdef"),
    (lambda d: (d / "tokenizer.json").write_text("{}"), [], "tokenizer.json is not the tokenizer the shards were"),
    (lambda d: None, ["--model.vocab_size", "1024"], "was prepared for vocab_size 512, but model.vocab_size is 1024"),
    (lambda d: None, ["--data.micro_batch", "1000"], "data: split 'val' of {data} has"),
]


@pytest.mark.parametrize("damage, args, message", DATA_CASES)
def test_trainer_data(capsys, tmp_path, data_copy, damage, args, message):
    damage(data_copy)
    argv = trainer_args(tmp_path / "runs", data_copy, *args)
    assert_refused(capsys, train.main, argv, message.format(data=data_copy), tmp_path)
    assert not (tmp_path / "runs").exists()


def test_missing_data_path(capsys, tmp_path):
    argv = trainer_args(tmp_path / "runs", tmp_path / "nowhere")
    assert_refused(capsys, train.main, argv, f"data: {tmp_path / 'nowhere'}: no manifest.json here", tmp_path)


# --- the run dir and the checkpoint to resume from ---------------------------------------------------------------

def test_run_dir_holding_a_run_needs_resume_or_overwrite(capsys, run_copy):
    runs, run_dir, argv = run_copy
    assert_refused(capsys, train.main, argv, f"train: {run_dir} already holds a run (config.toml, metrics.jsonl, "
                                             f"tokenizer.json, checkpoints, tensorboard); pass --resume", runs)


def test_overwrite_of_a_dir_that_is_not_a_run(capsys, tmp_path, prepared_data):
    victim = tmp_path / "runs" / "victim"
    (victim / "checkpoints").mkdir(parents=True)
    (victim / "config.toml").write_text("[project]\nname = 'not a run'\n")
    (victim / "checkpoints" / "model.bin").write_bytes(b"precious")
    argv = trainer_args(tmp_path / "runs", prepared_data, "--train.name", "victim", "--overwrite")
    assert_refused(capsys, train.main, argv, f"train: {victim} holds config.toml, checkpoints but no "
                                             f"moe_dist-run.json, so it is not a moe_dist run dir", tmp_path)


def test_overwrite_through_a_symlink(capsys, tmp_path, run_copy):
    runs, run_dir, argv = run_copy
    elsewhere = tmp_path / "elsewhere"
    shutil.move(run_dir / "checkpoints", elsewhere)
    (run_dir / "checkpoints").symlink_to(elsewhere)
    assert_refused(capsys, train.main, argv + ["--overwrite"],
                   f"train: --overwrite: {run_dir / 'checkpoints'} is a symbolic link", tmp_path)


def test_overwrite_of_files_it_cannot_remove(capsys, monkeypatch, run_copy):
    runs, run_dir, argv = run_copy
    locked = run_dir / "checkpoints" / "step-2"
    # Tests run as root, whom permissions do not stop: the check asks os.access, so ask it to say no.
    real_access = __import__("os").access
    monkeypatch.setattr("moe_dist.startup.os.access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    assert_refused(capsys, train.main, argv + ["--overwrite"],
                   f"train: --overwrite: cannot remove the files in {locked} (no write permission)", runs)


def test_read_only_run_dir(capsys, monkeypatch, run_copy):
    runs, run_dir, argv = run_copy
    real_access = __import__("os").access
    monkeypatch.setattr("moe_dist.files.os.access", lambda p, mode: Path(p) != run_dir and real_access(p, mode))
    assert_refused(capsys, train.main, argv + ["--resume", "--train.steps", "6"],
                   f"train: cannot write the run dir {run_dir}: {run_dir} is not writable", runs)


@pytest.mark.parametrize("where", ["run dir", "runs dir"])
def test_run_dir_that_is_a_file(capsys, tmp_path, prepared_data, where):
    runs = tmp_path / "runs"
    if where == "run dir":
        runs.mkdir()
        (runs / "tiny").write_text("a file")
        message = f"train: {runs / 'tiny'} exists and is not a directory"
    else:
        runs.write_text("a file")
        message = f"train: cannot write the run dir {runs / 'tiny'}: {runs} is not a directory"
    assert_refused(capsys, train.main, trainer_args(runs, prepared_data), message, tmp_path)


RESUME_CASES = {
    "COMPLETE not JSON": (lambda step: (step / "COMPLETE").write_text("{half"), "COMPLETE is unreadable"),
    "COMPLETE a list": (lambda step: (step / "COMPLETE").write_text("[]"), "COMPLETE is unreadable"),
    "a shard corrupted in place": (corrupt_in_place, "is corrupt (its CRC-32 is not the one recorded"),
    "a shard removed": (lambda step: next(step.glob("*.distcp")).unlink(), ".distcp is missing"),
    "COMPLETE removed": (lambda step: (step / "COMPLETE").unlink(), "incomplete (no COMPLETE file)"),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_strict_resume_from_a_bad_checkpoint(capsys, run_copy, case):
    runs, run_dir, argv = run_copy
    damage, message = RESUME_CASES[case]
    damage(run_dir / "checkpoints" / "step-4")
    assert_refused(capsys, train.main, argv + ["--resume", "--train.steps", "6"],
                   [f"checkpoint {run_dir / 'checkpoints' / 'step-4'}", message], runs)


def test_resume_with_no_checkpoint(capsys, run_copy):
    runs, run_dir, argv = run_copy
    shutil.rmtree(run_dir / "checkpoints")
    assert_refused(capsys, train.main, argv + ["--resume"], f"--resume: no checkpoint in {run_dir / 'checkpoints'}",
                   runs)


def test_checkpoint_of_another_model(capsys, run_copy):
    runs, run_dir, argv = run_copy
    assert_refused(capsys, train.main, argv + ["--resume", "--model.dim", "96"],
                   f"checkpoint {run_dir}/checkpoints/step-4: model.dim = 64 there, 96 in this config", runs)


def test_resuming_on_data_of_another_tokenizer(capsys, tmp_path, run_copy):
    runs, run_dir, argv = run_copy
    (tmp_path / "other.txt").write_text("class Other:\n    pass\n" * 300)
    (tmp_path / "more.txt").write_text("def more():\n    return 1\n" * 300)
    other = prep.prepare([tmp_path / "other.txt", tmp_path / "more.txt"], tmp_path / "other", 512, workers=1,
                         val_fraction=0.5)
    argv = [str(other) if a.endswith("out") else a for a in argv]  # --data.path: the prepared_data dir is .../out
    assert_refused(capsys, train.main, argv + ["--resume"],
                   f"was tokenized with another tokenizer than {run_dir}/tokenizer.json", tmp_path)


def test_resuming_one_dataset_with_a_mixture(capsys, tmp_path, run_copy, prepared_data):
    runs, run_dir, argv = run_copy
    assert_refused(capsys, train.main, argv + ["--data.path", "", "--data.mixture", f"{prepared_data}=1", "--resume"],
                   "trained on one dataset there, data.mixture in this config: its data position cannot continue",
                   tmp_path, prepared_data)


def test_resuming_adamw_with_muon(capsys, tmp_path, run_copy):
    runs, run_dir, argv = run_copy
    assert_refused(capsys, train.main, argv + ["--optim.name", "muon", "--resume"],
                   f"checkpoint {run_dir}/checkpoints/step-4: optim.name = 'adamw' there, 'muon' in this config: its "
                   f"optimizer state is of the other kind", runs)


def test_launcher_checks_once_before_torchrun(capsys, tmp_path, prepared_data):
    argv = ["--nproc", "2", *trainer_args(tmp_path / "runs", prepared_data, "--parallel.ep", "1",
                                          "--parallel.dp_shard", "4")]
    assert_refused(capsys, launch.main, argv, "config: parallel.dp_shard = 4 x parallel.ep = 1 must equal the world "
                                              "size 2", tmp_path)
    assert_refused(capsys, launch.main, ["--nproc", "-1"], "--nproc -1 and --max-restarts 0 must be >= 0", tmp_path)


def test_params_bad_mesh(capsys, tmp_path):
    assert_refused(capsys, params.main, ["--config", "tiny", "--world", "3", "--ep", "2"],
                   "parallel.ep = 2 must divide the world size 3", tmp_path)


# --- prep: a refused input leaves an earlier result, or a fresh --out, as it was ----------------------------------

def _parquet(path: Path, **columns) -> None:
    pq.write_table(pa.table(columns), path)


def _lines_with_a_bad_one(path: Path) -> None:
    lines = [json.dumps({"text": f"document {i}"}) for i in range(30)]
    lines[26] = '{"text": "cut off'
    path.write_text("\n".join(lines) + "\n")


def _tokenizer(path: Path, vocab: int, eos: bool = True) -> None:
    """A tokenizer.json beside a text input."""
    (path.parent / "a.txt").write_text("some text")
    tok = train_tokenizer(["some text to learn from " * 50], vocab)
    if not eos:
        data = json.loads(tok.to_str())
        data["added_tokens"] = []
        data["model"]["vocab"].pop("<|endoftext|>")
        path.write_text(json.dumps(data))
    else:
        tok.save(str(path))


PREP_CASES = {
    "parquet without the text column": (lambda d: _parquet(d / "a.parquet", body=["x"]), [],
                                        "a.parquet: no column 'text' (columns: body)"),
    "parquet text of another type": (lambda d: _parquet(d / "a.parquet", text=[1, 2]), [],
                                     "a.parquet: column 'text' is int64, not string"),
    "not parquet at all": (lambda d: (d / "a.parquet").write_bytes(b"PAR1 nope PAR1"), [],
                           "a.parquet: not a readable parquet file"),
    "bad JSON on line 27": (lambda d: _lines_with_a_bad_one(d / "a.jsonl"), [], "a.jsonl:27: not valid JSON"),
    "no text field": (lambda d: (d / "a.jsonl").write_text('{"text": "x"}\n{"body": "y"}\n'), [],
                      "a.jsonl:2: no 'text' field"),
    "text not a string": (lambda d: (d / "a.jsonl").write_text('{"text": 3}\n'), [],
                          "a.jsonl:1: field 'text' is int, not str"),
    "jsonl not UTF-8": (lambda d: (d / "a.jsonl").write_bytes(b'{"text": "caf\xe9"}\n'), [],
                        "a.jsonl:1: not UTF-8 text"),
    "another text field": (lambda d: (d / "a.jsonl").write_text('{"text": "x"}\n'), ["--text-field", "body"],
                           "a.jsonl:1: no 'body' field"),
    "empty file": (lambda d: (d / "a.txt").write_text(""), [], "a.txt: empty file"),
    "blank lines only": (lambda d: (d / "a.jsonl").write_text("\n\n"), [], "a.jsonl: empty file (no documents)"),
    "binary file": (lambda d: (d / "a.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" * 100), [],
                    "a.txt: binary data (a NUL byte at byte 7)"),
    "text not UTF-8": (lambda d: (d / "a.txt").write_bytes("déjà vu\n".encode("latin-1") * 10), [],
                       "a.txt: not UTF-8 text (invalid continuation byte at byte 1)"),
    "unsupported file type": (lambda d: (d / "a.csv").write_text("text\nx\n"), ["--input", "{in}/a.csv"],
                              "a.csv: unsupported file type"),
    "vocab too small": (lambda d: (d / "a.txt").write_text("x"), ["--vocab-size", "100"],
                        "vocab_size = 100 is too small for a byte-level tokenizer (min 257)"),
    "empty tokenizer file": (lambda d: (d / "tok.json").write_bytes(b"") or (d / "a.txt").write_text("x"),
                             ["--tokenizer", "{in}/tok.json"],
                             "tok.json: not a loadable tokenizer.json"),
    "tokenizer without EOS": (lambda d: _tokenizer(d / "tok.json", 300, eos=False), ["--tokenizer", "{in}/tok.json"],
                              "tok.json: tokenizer has no <|endoftext|> token"),
    "tokenizer over the vocab": (lambda d: _tokenizer(d / "tok.json", 300), ["--tokenizer", "{in}/tok.json",
                                 "--vocab-size", "260"], "tok.json: 274 tokens, more than vocab_size 260"),
    "no such input": (lambda d: None, ["--input", "{in}/nothing.txt"], "nothing.txt: no such file or directory"),
    "zero workers": (lambda d: (d / "a.txt").write_text("x"), ["--workers", "0"], "workers = 0 must be >= 1"),
    "val fraction 1": (lambda d: (d / "a.txt").write_text("x"), ["--val-fraction", "1"],
                       "val_fraction = 1.0 must be in [0, 1)"),
    "vocab not a number": (lambda d: (d / "a.txt").write_text("x"), ["--vocab-size", "many"],
                           "argument --vocab-size: invalid int value: 'many'"),
}


def _prep_argv(inputs: Path, out: Path, args: list[str]) -> list[str]:
    args = [a.replace("{in}", str(inputs)) for a in args]
    given = ["--input", str(inputs)] if "--input" not in args else []
    return [*given, "--out", str(out), "--vocab-size", "512", "--workers", "1", *args]


@pytest.mark.parametrize("case", PREP_CASES)
def test_prep(capsys, tmp_path, data_copy, case):
    make_input, args, message = PREP_CASES[case]
    inputs = tmp_path / "in"
    inputs.mkdir()
    make_input(inputs)
    # Into a dir that holds a good prepared dataset: refused, the dataset untouched.
    assert_refused(capsys, prep.main, _prep_argv(inputs, data_copy, args), message, tmp_path)
    # Into a fresh --out: refused, nothing left behind.
    assert_refused(capsys, prep.main, _prep_argv(inputs, tmp_path / "fresh", args), message, tmp_path)
    assert not (tmp_path / "fresh").exists() and not list(tmp_path.glob(".fresh*"))


def test_prep_out_that_is_not_prep_output(capsys, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.txt").write_text("some text")
    (tmp_path / "file").write_text("mine")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine too")
    cases = {tmp_path / "file": "data: --out {out} is a file; prep writes a directory",
             tmp_path / "mine": "data: --out {out} holds 'notes.txt', which prep did not write",
             inputs: f"data: input {inputs / 'a.txt'} is inside --out {inputs}, which prep replaces"}
    for out, message in cases.items():
        assert_refused(capsys, prep.main, _prep_argv(inputs, out, []), message.format(out=out), tmp_path)


# --- export and generate -------------------------------------------------------------------------------------------

def test_export(capsys, tmp_path, run_copy):
    runs, run_dir, argv = run_copy
    (tmp_path / "file").write_text("mine")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine too")
    over = f"would be written over {run_dir}, which it exports from"
    cases = {
        tmp_path / "file": f"export: --out {tmp_path / 'file'} is an existing file; give a new or empty directory",
        tmp_path / "full": f"export: --out {tmp_path / 'full'} is not empty; give a new or empty directory",
        run_dir: over, runs: over, run_dir / "checkpoints" / "export": over,
    }
    for out, message in cases.items():
        assert_refused(capsys, export.main, [str(run_dir), "--out", str(out)], message, tmp_path)
    assert_refused(capsys, export.main, [str(run_dir), "--out", str(tmp_path / "x"), "--dtype", "float8"],
                   "argument --dtype: invalid choice: 'float8'", tmp_path)
    assert_refused(capsys, export.main, [str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")],
                   f"checkpoint {tmp_path / 'nowhere'}: no such directory", tmp_path)
    shard = corrupt_in_place(run_dir / "checkpoints" / "step-4")
    assert_refused(capsys, export.main, [str(run_dir), "--out", str(tmp_path / "x")], f"file {shard} is corrupt",
                   tmp_path)
    (run_dir / "checkpoints" / "step-4" / "COMPLETE").write_text("not json")
    assert_refused(capsys, export.main, [str(run_dir), "--out", str(tmp_path / "x")], "COMPLETE is unreadable",
                   tmp_path)


@pytest.mark.parametrize("args, message", [
    (["--temperature", "nan"], "--temperature nan must be 0 (greedy) or a finite value >= 1e-06"),
    (["--temperature", "1e-310"], "--temperature 1e-310 must be 0 (greedy) or a finite value >= 1e-06"),
    (["--temperature", "-1"], "--temperature -1.0 must be 0 (greedy)"),
    (["--temperature", "inf"], "--temperature inf must be 0 (greedy)"),
    (["--top-p", "0"], "needs --top-k >= 0, 0 < --top-p <= 1 and --max-new-tokens >= 0 (got 0, 0.0, 100)"),
    (["--top-p", "nan"], "0 < --top-p <= 1"),
    (["--top-k", "-1"], "needs --top-k >= 0"),
    (["--max-new-tokens", "x"], "argument --max-new-tokens: invalid int value: 'x'"),
])
def test_generate(capsys, tmp_path, run_copy, args, message):
    runs, run_dir, argv = run_copy
    assert_refused(capsys, generate.main, ["--checkpoint", str(run_dir), *args], message, tmp_path)


def test_generate_from_a_missing_or_corrupt_checkpoint(capsys, tmp_path, run_copy):
    runs, run_dir, argv = run_copy
    assert_refused(capsys, generate.main, ["--checkpoint", str(tmp_path / "nowhere")], "no such directory", tmp_path)
    shard = corrupt_in_place(run_dir / "checkpoints" / "step-4")
    assert_refused(capsys, generate.main, ["--checkpoint", str(run_dir)], f"file {shard} is corrupt", tmp_path)
