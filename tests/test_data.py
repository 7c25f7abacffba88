"""Data pipeline: prep round trip and errors, manifest reuse, loader sharding/resume, default corpus."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from moe_dist.data import DataError, corpus
from moe_dist.data.flags import LOSS
from moe_dist.data.loader import DataLoader, TokenShards, check_compatible
from moe_dist.data.manifest import FORMAT_VERSION, SHARD_TOKENIZER_KEY, read_manifest, shard_record
from moe_dist.data.prep import prepare, val_documents
from moe_dist.data.tokenizer import file_hash, load_tokenizer

VOCAB = 300
TXT = "The quick brown fox jumps over the lazy dog.\nZoë's café — naïve 🦊 fox.\n" * 3
JSONL_DOCS = ["def add(a, b):\n    return a + b\n", "print('hello, world')", "x = [i * i for i in range(10)]\n"]
PARQUET_DOCS = ["Parquet row one.", "Row two has\ttabs and  spaces.", "Row three: ünïcödé ✓", "Row four."]


def _write_inputs(root: Path) -> list[str]:
    """One txt, one jsonl and one parquet file (two row groups); returns their documents in prep's order."""
    root.mkdir(parents=True)
    (root / "a.txt").write_text(TXT, encoding="utf-8")
    (root / "b.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(JSONL_DOCS)) + "\n")
    pq.write_table(pa.table({"text": PARQUET_DOCS}), root / "c.parquet", row_group_size=2)
    return [TXT, *JSONL_DOCS, *PARQUET_DOCS]


def _decode_docs(data_dir: Path) -> list[str]:
    """Both splits' token streams, cut at EOS and decoded."""
    manifest = read_manifest(data_dir)
    tok = load_tokenizer(data_dir / manifest["tokenizer"]["file"])
    stream = np.concatenate([TokenShards(data_dir, s).read(0, len(TokenShards(data_dir, s)))[0]
                             for s in ("train", "val")])
    assert stream[-1] == manifest["eos_id"]
    cuts = np.flatnonzero(stream == manifest["eos_id"])
    return [tok.decode(doc.tolist()) for doc in np.split(stream, cuts + 1)[:-1]]


def test_prep_round_trip(tmp_path, capsys):
    docs = _write_inputs(tmp_path / "in")
    out = prepare([tmp_path / "in"], tmp_path / "out", VOCAB, workers=2, shard_tokens=64, val_fraction=0.25)
    m = read_manifest(out)
    train_tokens, val_tokens = (m["splits"][split]["tokens"] for split in ("train", "val"))
    report = capsys.readouterr().err.splitlines()[-1]  # both splits' counts
    assert f"train {train_tokens:,} tokens" in report and f"val {val_tokens:,} tokens" in report
    assert (m["vocab_size"], m["dtype"], m["eos_id"]) == (VOCAB, "uint16", 0)
    assert m["tokenizer_vocab_size"] <= VOCAB
    tok = load_tokenizer(out / "tokenizer.json")
    doc_tokens = np.array([len(tok.encode(d).ids) + 1 for d in docs])  # + EOS
    first, last = val_documents(doc_tokens, 0.25)
    assert 0 < last - first < len(docs)
    assert _decode_docs(out) == docs[:first] + docs[last:] + docs[first:last]  # train, then val
    val, train = m["splits"]["val"], m["splits"]["train"]
    assert (val["documents"], train["documents"]) == (last - first, len(docs) - (last - first))
    assert val["tokens"] == val_tokens == doc_tokens[first:last].sum() <= 0.25 * doc_tokens.sum()
    for split in (train, val):
        sizes = [s["tokens"] for s in split["shards"]]
        assert sum(sizes) == split["tokens"] and max(sizes) <= 64
        for shard in split["shards"]:
            with pa.memory_map(str(out / shard["file"])) as source:
                table = pa.ipc.open_file(source).read_all()
            assert table.schema == pa.schema([("tokens", pa.uint16()), ("flags", pa.uint8())])
            assert table.num_rows == shard["tokens"]
    assert TokenShards(out, "train").chunks[0][0].dtype == np.uint16


@pytest.mark.parametrize("tokens, fraction, expected", [
    ([100] * 110 + [5000, 5000], 0.02, (106, 110)),  # the two long last documents stay in train: val 1.9%, not 48%
    ([10, 10, 10, 10], 0.5, (2, 4)),
    ([50, 40, 60], 0.1, (1, 2)),  # none fits: the smallest one, so that val is never empty
    ([50, 40, 60], 0.0, (3, 3)),
    ([100], 0.5, (1, 1)),  # one document cannot be split
])
def test_val_split_is_by_tokens(tokens, fraction, expected):
    assert val_documents(np.array(tokens), fraction) == expected


def test_prep_reuses_and_rebuilds(tmp_path, capsys):
    _write_inputs(tmp_path / "in")
    out = prepare([tmp_path / "in"], tmp_path / "out", VOCAB, workers=1)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    prepare([tmp_path / "in"], tmp_path / "out", VOCAB, workers=1)
    assert "reusing" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    # A given tokenizer is copied and gives the same tokens; another option means a rebuild.
    again = prepare([tmp_path / "in"], tmp_path / "out2", VOCAB, tokenizer=out / "tokenizer.json", workers=1,
                    shard_tokens=32)
    assert "reusing" not in capsys.readouterr().err
    assert read_manifest(again)["tokenizer"]["hash"] == read_manifest(out)["tokenizer"]["hash"]
    for split in ("train", "val"):
        a, b = TokenShards(out, split), TokenShards(again, split)
        assert all(np.array_equal(x, y) for x, y in zip(a.read(0, len(a)), b.read(0, len(b))))


@pytest.mark.parametrize("name, content, where", [
    ("empty.txt", b"", "empty.txt"),
    ("bad.jsonl", b'{"text": "fine"}\n{"text": "broken\n', "bad.jsonl:2"),
    ("nofield.jsonl", b'{"text": "fine"}\n{"body": "no text"}\n', "nofield.jsonl:2"),
    ("bad.parquet", b"PAR1 this is not parquet at all PAR1", "bad.parquet"),
])
def test_prep_errors_name_the_file(tmp_path, name, content, where):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as info:
        prepare([tmp_path / name], tmp_path / "out", VOCAB, workers=1)
    message = str(info.value)
    assert where in message and "\n" not in message
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_prep_missing_parquet_column(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c\.parquet: no column 'text' \(columns: body\)"):
        prepare([tmp_path], tmp_path / "out", VOCAB, workers=1)


def test_prep_cli_error_is_one_line(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    result = subprocess.run([sys.executable, "-m", "moe_dist.data.prep", "--input", str(tmp_path / "empty.jsonl"),
                             "--vocab-size", "300", "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"data: {tmp_path / 'empty.jsonl'}: empty file"]


def arange_data(root: Path, n_tokens: int, shard_tokens: int, vocab_size: int = 2**16, tokenizer: str = "{}",
                first: int = 0) -> Path:
    """A prepared-data dir by hand whose train tokens are first, first + 1, ... (mod vocab_size): a window's first
    token names it."""
    root.mkdir(parents=True)
    (root / "tokenizer.json").write_text(tokenizer)
    splits = {}
    for split, n in (("train", n_tokens), ("val", n_tokens)):
        shards = []
        for k, start in enumerate(range(0, n, shard_tokens)):
            tokens = (np.arange(first + start, first + min(start + shard_tokens, n)) % vocab_size).astype(np.uint16)
            flags = np.full(len(tokens), LOSS, dtype=np.uint8)
            schema = pa.schema([("tokens", pa.uint16()), ("flags", pa.uint8())],
                               metadata={SHARD_TOKENIZER_KEY: file_hash(root / "tokenizer.json")})
            with pa.ipc.new_file(str(root / f"{split}-{k:05d}.arrow"), schema) as writer:
                writer.write_batch(pa.record_batch([pa.array(tokens), pa.array(flags)], schema=schema))
            shards.append(shard_record(root / f"{split}-{k:05d}.arrow", len(tokens)))
        splits[split] = {"shards": shards, "tokens": n, "documents": 1}
    manifest = {"format": FORMAT_VERSION, "vocab_size": vocab_size, "dtype": "uint16", "eos_id": 0, "splits": splits,
                "tokenizer": {"file": "tokenizer.json", "hash": file_hash(root / "tokenizer.json")}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


SEQ, WINDOWS = 8, 48  # 48 windows: a whole number of global batches for world sizes 1, 2, 4 at micro_batch 2 or 3


@pytest.fixture
def arange_dir(tmp_path):
    return arange_data(tmp_path / "d", SEQ * WINDOWS + 1, shard_tokens=50)  # windows straddle shard ends


@pytest.mark.parametrize("world", [1, 2, 4])
def test_loader_ranks_disjoint_and_cover_epoch(arange_dir, world):
    loaders = [DataLoader(arange_dir, "train", SEQ, 2, rank=r, world_size=world, seed=7) for r in range(world)]
    seen = []
    for _ in range(WINDOWS // (2 * world)):
        for loader in loaders:
            inputs, targets, *_ = next(loader)
            assert inputs.dtype == targets.dtype == torch.int64 and inputs.shape == (2, SEQ)
            assert torch.equal(targets, inputs + 1)  # targets are the inputs shifted by one
            assert torch.all(inputs[:, 0] % SEQ == 0)
            seen += (inputs[:, 0] // SEQ).tolist()
    assert sorted(seen) == list(range(WINDOWS))
    assert seen != sorted(seen)  # shuffled
    assert all(loader.state_dict() == {"epoch": 0, "position": WINDOWS} for loader in loaders)


def test_loader_one_rank_equals_concatenated_ranks(arange_dir):
    world, micro = 4, 3  # 48 // 12 = 4 steps per epoch; 10 steps cross two epoch boundaries
    single = DataLoader(arange_dir, "train", SEQ, world * micro, seed=3)
    ranks = [DataLoader(arange_dir, "train", SEQ, micro, rank=r, world_size=world, seed=3) for r in range(world)]
    for _ in range(10):
        parts = [next(loader) for loader in ranks]
        inputs, targets, *_ = next(single)
        assert torch.equal(inputs, torch.cat([p[0] for p in parts]))
        assert torch.equal(targets, torch.cat([p[1] for p in parts]))
    assert single.state_dict()["epoch"] == 2


def test_loader_resume_and_epochs(arange_dir):
    loader = DataLoader(arange_dir, "train", SEQ, 4, rank=1, world_size=2, seed=5)
    first_epoch = [next(loader)[0] for _ in range(6)]
    second_epoch = [next(loader)[0] for _ in range(6)]
    assert not all(torch.equal(a, b) for a, b in zip(first_epoch, second_epoch))  # a new order each epoch
    for k in (0, 3, 6, 7):
        loader = DataLoader(arange_dir, "train", SEQ, 4, rank=1, world_size=2, seed=5)
        for _ in range(k):
            next(loader)
        restored = DataLoader(arange_dir, "train", SEQ, 4, rank=1, world_size=2, seed=5)
        restored.load_state_dict(loader.state_dict())
        for _ in range(8):
            assert all(torch.equal(a, b) for a, b in zip(next(loader)[:2], next(restored)[:2]))


def test_val_loader_is_ordered_and_resettable(arange_dir):
    loader = DataLoader(arange_dir, "val", SEQ, 2, rank=1, world_size=2)
    first = [next(loader)[0][:, 0] // SEQ for _ in range(3)]
    assert [f.tolist() for f in first] == [[2, 3], [6, 7], [10, 11]]
    loader.reset()
    assert torch.equal(next(loader)[0][:, 0] // SEQ, first[0])


def test_loader_errors(tmp_path, arange_dir):
    with pytest.raises(DataError, match=r"split 'val' .* has 385 tokens in 48 windows of 8 \+ 1, one global batch "
                                        r"needs 52 \(2 ranks x 26 sequences\)"):
        DataLoader(arange_dir, "val", SEQ, 26, rank=0, world_size=2)
    with pytest.raises(DataError, match="no manifest.json"):
        DataLoader(tmp_path / "nowhere", "train", SEQ, 2)
    check_compatible(arange_dir, 2**16, SEQ, 2, 1)
    with pytest.raises(DataError, match=r"prepared for vocab_size 65536, but model.vocab_size is 4096") as info:
        check_compatible(arange_dir, 4096, SEQ, 2, 1)
    assert str(arange_dir / "manifest.json") in str(info.value)
    manifest = json.loads((arange_dir / "manifest.json").read_text())
    manifest["dtype"] = "uint32"
    (arange_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"train-00000.arrow: tokens are uint16 but the manifest says uint32"):
        check_compatible(arange_dir, 2**16, SEQ, 2, 1)


def test_shards_of_another_tokenizer_are_refused(tmp_path, arange_dir):
    check_compatible(arange_dir, 2**16, SEQ, 2, 1)
    other = arange_data(tmp_path / "other", 100, shard_tokens=50, tokenizer='{"another": 1}')
    (arange_dir / "train-00001.arrow").write_bytes((other / "train-00001.arrow").read_bytes())
    with pytest.raises(DataError, match=r"train-00001.arrow: built with tokenizer \w+, but the manifest's is"):
        check_compatible(arange_dir, 2**16, SEQ, 2, 1)
    (other / "tokenizer.json").write_text("{}")  # replaced after prep: no longer the shards' tokenizer
    with pytest.raises(DataError, match=r"other/tokenizer.json is not the tokenizer the shards were built with"):
        check_compatible(other, 2**16, SEQ, 2, 1)


def test_default_corpus_builds_once(tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    files = {
        "abc.py": "class ABC:\n    pass\n",
        "json/decoder.py": "def decode(s):\n    return s.strip()\n" * 20,
        "json/encoder.py": "def encode(obj):\n    return repr(obj)\n" * 20,
        "test/test_abc.py": "import unittest\n",
        "site-packages/pkg.py": "third party\n",
        "zzz_big.py": "x = 1\n" * 1000,  # beyond the cap
    }
    for name, text in files.items():
        (lib / name).parent.mkdir(parents=True, exist_ok=True)
        (lib / name).write_text(text)
    (lib / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    monkeypatch.setattr(corpus, "stdlib_dir", lambda: lib)
    monkeypatch.setattr(corpus, "STDLIB_CAP_BYTES", 4000)
    cache = tmp_path / "cache"
    name = f"stdlib-f{FORMAT_VERSION}-v300"
    (cache / f".{name}.prep-tmp").mkdir(parents=True)  # half-built by a killed prep
    (cache / f".{name}.prep-tmp" / "train-00000.arrow").write_bytes(b"junk")
    out = corpus.default_corpus(cache, VOCAB)
    assert out == cache / name and not (cache / f".{name}.prep-tmp").exists()
    assert sorted(_decode_docs(out)) == sorted([files["abc.py"], files["json/decoder.py"], files["json/encoder.py"]])
    mtime = (out / "manifest.json").stat().st_mtime_ns
    start = time.monotonic()
    assert corpus.default_corpus(cache, VOCAB) == out
    assert time.monotonic() - start < 0.1 and (out / "manifest.json").stat().st_mtime_ns == mtime
    check_compatible(out, VOCAB, 4, 1, 1)
