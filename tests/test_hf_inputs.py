"""Hugging Face inputs that must not load: NaN or infinite weights (on any rank), index entries outside the model
dir; and the special-token ids an export carries from the model it was imported from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from distributed import run_on_ranks
from hf_models import save_tiny
from safetensors.torch import load_file, save_file

from moe_dist import export, train
from moe_dist.data import prep
from moe_dist.checkpoint import CheckpointError
from moe_dist.data.tokenizer import EOS_TOKEN, train_tokenizer
from moe_dist.hf.config import SOURCE_TOKEN_IDS, config_from_hf, family_of, with_init_from
from moe_dist.hf.weights import open_init_weights
from moe_dist.model import Transformer
from moe_dist.parallel.mesh import Runtime, build_mesh
from moe_dist.train import build_model

MIXTRAL = "model.layers.0.block_sparse_moe."
TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs."
IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def set_value(path: Path, key: str, value: float) -> None:
    tensors = load_file(path)
    tensors[key].view(-1)[-1] = value
    save_file(tensors, path, metadata={"format": "pt"})


def export_fails(source: Path, out: Path, capsys) -> str:
    """export --format hf of `source`: exit 2, one stderr line (returned), nothing written."""
    capsys.readouterr()
    assert export.main([str(source), "--out", str(out), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not out.exists(), err
    return err


@pytest.mark.parametrize("layout, key, value", [("single", "model.norm.weight", float("nan")),
                                                ("fused", "model.layers.1.mlp.experts.down_proj", float("-inf"))])
def test_a_nan_or_inf_weight_is_one_line_naming_the_tensor(tmp_path, capsys, layout, key, value):
    save_tiny("mixtral", tmp_path / "src", layout)
    set_value(tmp_path / "src" / "model.safetensors", key, value)
    err = export_fails(tmp_path / "src", tmp_path / "out", capsys)
    assert f"{tmp_path / 'src' / 'model.safetensors'}: tensor {key} holds NaN or infinite values" in err, err


def test_a_run_from_weights_with_a_nan_writes_nothing(tmp_path, capsys):
    # The NaN is found while the weights are read, which is before the run dir's first write.
    source = tmp_path / "src"
    save_tiny("mixtral", source, vocab_size=320)
    set_value(source / "model.safetensors", MIXTRAL + "gate.weight", float("nan"))
    train_tokenizer([TEXT], 300).save(str(source / "tokenizer.json"))
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": f"{i}: {TEXT}"}) + "\n" for i in range(60)))
    assert prep.main(["--input", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "data"), "--tokenizer",
                      str(source), "--vocab-size", "320"]) == 0
    capsys.readouterr()
    runs = tmp_path / "runs"
    assert train.main(["--train.init_from", str(source), "--data.path", str(tmp_path / "data"), "--metrics.runs_dir",
                       str(runs), "--data.seq_len", "16", "--data.micro_batch", "1", "--train.eval_steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"tensor {MIXTRAL}gate.weight holds NaN or infinite values" in err, err
    assert not runs.exists()


def build_worker(rank, world_size, cfg):
    runtime = Runtime(rank, world_size, rank, torch.device("cpu"))
    try:
        build_model(cfg, build_mesh(cfg, world_size, "cpu"), runtime, open_init_weights(cfg).read)
    except CheckpointError as e:
        return str(e)
    return None


@pytest.mark.slow
def test_a_nan_that_one_rank_reads_stops_every_rank(tmp_path):
    """Under ep 2 only rank 1 reads expert 3: rank 0 must stop too, with rank 1's message."""
    save_tiny("mixtral", tmp_path)
    set_value(tmp_path / "model.safetensors", MIXTRAL + "experts.3.w1.weight", float("nan"))
    cfg = config_from_hf(tmp_path, {"data.seq_len": 16, "parallel.ep": 2, "train.init_from": str(tmp_path)})
    errors = run_on_ranks(build_worker, 2, cfg)
    assert errors[0] == errors[1] and f"tensor {MIXTRAL}experts.3.w1.weight holds NaN" in errors[0], errors


@pytest.mark.parametrize("absolute", [False, True])
def test_an_index_entry_outside_the_model_dir_is_one_line_naming_it(tmp_path, capsys, absolute):
    source = tmp_path / "src"
    save_tiny("mixtral", source, "sharded")
    index = json.loads((source / "model.safetensors.index.json").read_text())
    key = MIXTRAL + "gate.weight"
    shard = tmp_path / "elsewhere" / index["weight_map"][key]
    shard.parent.mkdir()
    (source / shard.name).rename(shard)  # the weights are there, so the old import read them
    moved = [name for name, file in index["weight_map"].items() if file == shard.name]
    entry = str(shard) if absolute else f"../elsewhere/{shard.name}"
    index["weight_map"].update(dict.fromkeys(moved, entry))
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    err = export_fails(source, tmp_path / "out", capsys)
    assert f"model.safetensors.index.json: entry {moved[0]} names {json.dumps(entry)}, outside {source}" in err, err


def source_ids(directory: Path) -> dict:
    data = json.loads((directory / "config.json").read_text())
    return {key: data[key] for key in IDS if key in data}


def save_with_ids(family: str, directory: Path, ids: dict) -> None:
    """A tiny model whose config.json holds exactly `ids` among the special-token ids (absent: left out)."""
    save_tiny(family, directory)
    data = {key: value for key, value in json.loads((directory / "config.json").read_text()).items()
            if key not in IDS}
    (directory / "config.json").write_text(json.dumps({**data, **ids}))


# OLMoE: bos null and an explicit pad (transformers' defaults: pad 1); Mixtral: no pad_token_id at all.
SOURCES = [("olmoe", {"bos_token_id": None, "eos_token_id": 7, "pad_token_id": 5}),
           ("mixtral", {"bos_token_id": 1, "eos_token_id": 2})]


@pytest.mark.parametrize("family, ids", SOURCES)
def test_export_of_a_hf_dir_carries_its_special_token_ids(tmp_path, family, ids):
    save_with_ids(family, tmp_path / "src", ids)
    assert export.main([str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--format", "hf"]) == 0
    assert source_ids(tmp_path / "out") == ids
    want, got = (transformers.AutoConfig.from_pretrained(tmp_path / d) for d in ("src", "out"))
    assert [getattr(got, key) for key in IDS] == [getattr(want, key) for key in IDS]


def test_a_run_imported_from_hf_exports_its_sources_ids_not_its_tokenizers(tmp_path, capsys):
    """A run's config names its source (train.init_from): the export takes the ids from there, not from the run's
    tokenizer; a source that is gone leaves the tokenizer's ids (as for a run of our own), with a warning."""
    family, ids = SOURCES[0]
    save_with_ids(family, tmp_path / "src", ids)
    tokenizer = tmp_path / "tokenizer.json"
    train_tokenizer(["a b c"], 300).save(str(tokenizer))
    cfg = with_init_from("tiny", {"train.init_from": str(tmp_path / "src"), "data.seq_len": "16"})
    model = Transformer(cfg.model, cfg.moe)
    (tmp_path / "out").mkdir()
    export.write_export(model, cfg, tokenizer, tmp_path / "out", family_of(cfg), "float32")
    assert source_ids(tmp_path / "out") == ids

    # A run keeps a copy beside its tokenizer.json (startup writes it): the source may go.
    (tmp_path / SOURCE_TOKEN_IDS).write_text(json.dumps(ids))
    (tmp_path / "src" / "config.json").unlink()
    (tmp_path / "kept").mkdir()
    export.write_export(model, cfg, tokenizer, tmp_path / "kept", family_of(cfg), "float32")
    assert source_ids(tmp_path / "kept") == ids

    (tmp_path / SOURCE_TOKEN_IDS).unlink()
    (tmp_path / "gone").mkdir()
    export.write_export(model, cfg, tokenizer, tmp_path / "gone", family_of(cfg), "float32")
    eos = train_tokenizer(["a b c"], 300).token_to_id(EOS_TOKEN)
    assert source_ids(tmp_path / "gone") == {"bos_token_id": eos, "eos_token_id": eos}
    assert "its special-token ids are not carried" in capsys.readouterr().err
