"""Data mixtures: shares within one window of the weights, every rank's windows, exact resume, per-source loss."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import run_on_ranks
from equivalence import MICRO_BATCH, small_config
from test_data import arange_data
from test_documents import CHAT_TEMPLATE, CHATS, SENTENCES, tokenizer_dir, write_jsonl

from moe_dist.config import ConfigError, MixtureSource, load_config, to_toml
from moe_dist.data import DataError
from moe_dist.data.corpus import stdlib_dir
from moe_dist.data.mixture import MixtureLoader, check_mixture, next_sources
from moe_dist.data.flags import IGNORE
from moe_dist.data.prep import RecordOptions, prepare
from moe_dist.model import Transformer
from moe_dist.optim import build_optimizer, build_scheduler
from moe_dist.parallel.mesh import Runtime, build_mesh
from moe_dist.train import build_model, main, train_step
from runs import SMALL_MODEL, trainer_args

SEQ = 8
OFFSET = 20_000  # source b's tokens start here: a window's first token names its source and its place


def test_every_source_stays_within_one_window_of_its_share():
    rng = np.random.default_rng(0)
    for k in (1, 2, 3, 5, 8):
        weights = rng.random(k) ** 3 + 1e-3  # shares from about 0 to about 1
        weights /= weights.sum()
        taken, order = np.zeros(k), []
        while len(order) < 3000:  # global batches of any size
            order += next_sources(weights, taken, int(rng.integers(1, 40))).tolist()
        assert np.array_equal(np.bincount(order, minlength=k), taken)
        counts = np.cumsum(np.eye(k)[order], axis=0)  # after every window, not only at the end of a batch
        assert np.abs(counts - weights * np.arange(1, len(order) + 1)[:, None]).max() < 1, k
        assert next_sources(weights, np.zeros(k), 500).tolist() == order[:500]  # a fixed order, not a draw


@pytest.fixture
def sources(tmp_path):
    """a: 48 windows, b: 10 windows (it repeats), weights 2 : 1."""
    a = arange_data(tmp_path / "a", SEQ * 48 + 1, shard_tokens=50)
    b = arange_data(tmp_path / "b", SEQ * 10 + 1, shard_tokens=30, first=OFFSET)
    return [MixtureSource(str(a), 2.0), MixtureSource(str(b), 1.0)]


def loaders(sources, world: int, micro: int) -> list[MixtureLoader]:
    return [MixtureLoader(sources, SEQ, micro, rank=r, world_size=world, seed=3) for r in range(world)]


def windows_of(batches) -> list[tuple[int, int]]:
    """(source, first token) of each sequence."""
    return [(int(s), int(t)) for b in batches for s, t in zip(b.source, b.inputs[:, 0])]


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_together_see_what_one_process_sees_and_resume_exactly_at_another_world(sources, world):
    (single,) = loaders(sources, 1, 2 * world)
    want = windows_of(next(single) for _ in range(12))
    assert all((token >= OFFSET) == (source == 1) for source, token in want)  # Batch.source names the source
    assert len({w for w in want if w[0] == 1}) == 10  # b gave all its windows, then repeated: 12 * 2 * W / 3 > 10
    ranks = loaders(sources, world, 2)
    got = []
    for step in range(12):
        if step == 5:  # resume at the other world size: 4 <-> 2 ranks
            state = ranks[0].state_dict()
            assert all(r.state_dict() == state for r in ranks)  # the position is global
            ranks = loaders(sources, 6 - world, 2 * world // (6 - world))
            assert all(r.load_state_dict(state) for r in ranks)
        got += windows_of([next(r) for r in ranks])
    assert got == want
    counts = np.bincount([s for s, _ in got])
    assert abs(counts[0] - len(got) * 2 / 3) < 1 and ranks[0].taken == counts.tolist()
    assert single.repeats and single.repeats[0][0] == "b"  # when b ran out


def test_changed_weights_continue_every_source_from_its_own_position(sources, tmp_path):
    (loader,) = loaders(sources, 1, 4)
    for _ in range(3):
        next(loader)
    state = loader.state_dict()
    continued = MixtureLoader(sources, SEQ, 1, seed=3)
    assert continued.load_state_dict(state)
    c = arange_data(tmp_path / "c", SEQ * 8 + 1, shard_tokens=50, first=40_000)
    reweighted = MixtureLoader([MixtureSource(sources[1].path, 5.0), sources[0], MixtureSource(str(c), 1.0)], SEQ,
                               1, seed=3)
    assert not reweighted.load_state_dict(state)  # the weights changed: the shares count afresh
    # Each source's next window is the one it would have given under the old weights.
    nexts, firsts = {}, {}
    for _ in range(40):
        for source, token in windows_of([next(continued)]):
            nexts.setdefault(continued.names[source], token)
        for source, token in windows_of([next(reweighted)]):
            firsts.setdefault(reweighted.names[source], token)
    assert firsts["a"] == nexts["a"] and firsts["b"] == nexts["b"]
    assert firsts["c"] in {40_000 + SEQ * i for i in range(8)}  # a new source starts at its beginning
    shares = np.array(reweighted.taken) - np.array([loader.taken[1], loader.taken[0], 0])
    assert np.abs(shares - np.array([5, 2, 1]) / 8 * shares.sum()).max() < 1


def test_the_sources_must_share_a_tokenizer(sources, tmp_path):
    other = arange_data(tmp_path / "other", SEQ * 10 + 1, shard_tokens=50, tokenizer='{"another": 1}')
    with pytest.raises(DataError, match=r"^data: .*other/manifest.json: tokenized with tokenizer .* share one tokeni"):
        check_mixture([*sources, MixtureSource(str(other), 1.0)], 2**16, SEQ, 2, 1)
    assert check_mixture(sources, 2**16, SEQ, 2, 1) == Path(sources[0].path)


def test_chats_and_documents_mix_under_document_masking(tmp_path):
    source, _ = tokenizer_dir(tmp_path / "tok", CHAT_TEMPLATE)
    write_jsonl(tmp_path / "chats.jsonl", CHATS * 20)
    write_jsonl(tmp_path / "docs.jsonl", [{"text": " ".join(SENTENCES[i % 4:] + SENTENCES[:i % 4])} for i in range(60)])
    chats = prepare([tmp_path / "chats.jsonl"], tmp_path / "chat", 320, tokenizer=source, workers=1,
                    val_fraction=0.1, records=RecordOptions(chat=True))
    docs = prepare([tmp_path / "docs.jsonl"], tmp_path / "docs", 320, tokenizer=source, workers=1, val_fraction=0.1)
    mixture = [MixtureSource(str(chats), 1.0), MixtureSource(str(docs), 1.0)]
    with pytest.raises(DataError, match="holds chats, packed several to a window: set data.document_mask = true"):
        MixtureLoader(mixture, 128, 4)
    batch = next(MixtureLoader(mixture, 128, 4, document_mask=True))
    assert sorted(batch.source.tolist()) == [0, 0, 1, 1] and batch.segments is not None
    for row, source in enumerate(batch.source.tolist()):
        counted = (batch.targets[row] != IGNORE).float().mean().item()
        # A chat counts its answers only; documents every target but the first of each document.
        assert counted < 0.5 if source == 0 else counted > 0.8, (source, counted)


@pytest.mark.parametrize("value, message", [
    ("a=1,b", "must be a list of {path = ..., weight = ...} tables"),
    ("a=0", "data.mixture[0].weight = 0.0 must be finite and > 0"),
    ("x/a=1,y/a=2", "data.mixture[1] is named 'a', as another source is"),
    ("a=heavy", "data.mixture[0].weight must be float, got 'heavy'"),
])
def test_a_bad_mixture_is_one_line(value, message):
    with pytest.raises(ConfigError, match=None) as error:
        load_config("tiny", {"data.mixture": value})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_mixture_from_toml_and_the_command_line(tmp_path):
    toml = tmp_path / "mix.toml"
    toml.write_text('[data]\nmixture = [{path = "d/web", weight = 3}, {path = "d/code", weight = 1, name = "py"}]\n')
    cfg = load_config(str(toml))
    assert cfg.data.mixture == [MixtureSource("d/web", 3.0), MixtureSource("d/code", 1.0, "py")]
    assert [s.label for s in cfg.data.mixture] == ["web", "py"]
    (tmp_path / "again.toml").write_text(to_toml(cfg))  # what a run dir's config.toml holds loads back
    assert load_config(str(tmp_path / "again.toml")).data.mixture == cfg.data.mixture
    assert load_config("tiny", {"data.mixture": "d/web=3,d/code=1"}).data.mixture[1] == MixtureSource("d/code", 1.0)
    with pytest.raises(ConfigError, match="data.path and data.mixture exclude each other"):
        load_config("tiny", {"data.mixture": "d/web=3", "data.path": "d/web"})


def mixture_steps(rank, world_size, cfg, sources, steps, resume_at, micro=MICRO_BATCH):
    """Per step: loss, per-source losses and windows taken, on this rank's part, the loader rebuilt at step
    `resume_at` from its state (a resume). One process builds the plain model: the reference."""
    if world_size > 1:
        model = build_model(cfg, build_mesh(cfg, world_size, "cpu"), Runtime(rank, world_size, rank,
                                                                             torch.device("cpu")))
    else:
        model = Transformer(cfg.model, cfg.moe, seed=cfg.train.seed)
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)

    def loader():
        return MixtureLoader(sources, cfg.data.seq_len, micro, rank, world_size, cfg.data.seed, document_mask=True)

    data, out = loader(), []
    for step in range(steps):
        if step == resume_at:
            state, data = data.state_dict(), loader()
            data.load_state_dict(state)
        result = train_step(model, optimizer, scheduler, [next(data)], cfg.optim.grad_clip, len(sources))
        out.append((result.loss, result.source_losses, list(data.taken)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_mixture_training_over_ranks_equals_one_process(tmp_path, world_size):
    cfg = small_config(**{"parallel.ep": "2", "data.document_mask": "true"})
    vocab, seq = cfg.model.vocab_size, cfg.data.seq_len
    a = arange_data(tmp_path / "a", seq * 40 + 1, shard_tokens=100, vocab_size=vocab)
    b = arange_data(tmp_path / "b", seq * 6 + 1, shard_tokens=100, vocab_size=vocab, first=7)
    sources = [MixtureSource(str(a), 3.0), MixtureSource(str(b), 1.0)]
    per_rank = run_on_ranks(mixture_steps, world_size, cfg, sources, 4, 2)
    want = mixture_steps(0, 1, cfg, sources, 4, None, MICRO_BATCH * world_size)  # every rank's rows
    for rank, got in enumerate(per_rank):
        for (loss, source_losses, taken), (want_loss, want_sources, want_taken) in zip(got, want):
            assert loss == pytest.approx(want_loss, rel=1e-5), rank
            assert source_losses == pytest.approx(want_sources, rel=1e-5), rank
            assert taken == want_taken
            assert abs(taken[0] - sum(taken) * 3 / 4) < 1
    # The per-source losses are each source's mean: the step's loss is their mean weighted by targets.
    loss, source_losses, taken = want[0]
    assert loss == pytest.approx(np.average(source_losses, weights=taken), rel=1e-5)


@pytest.fixture(scope="module")
def small_source(tmp_path_factory, prepared_data):
    """A few windows of text tokenized as prepared_data is: it runs out within a few steps."""
    root = tmp_path_factory.mktemp("small")
    text = (stdlib_dir() / "json" / "decoder.py").read_text()
    (root / "in").mkdir()
    for i in range(4):  # documents: half of them the val split
        (root / "in" / f"{i}.txt").write_text(text[i * 500:(i + 1) * 500])
    return prepare([root / "in"], root / "code", 512, tokenizer=prepared_data / "tokenizer.json", workers=1,
                   val_fraction=0.5)


def records(run_dir, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_a_mixture_run_logs_each_source_and_resumes_bit_exact(tmp_path, prepared_data, small_source, capsys):
    mixture = f"{prepared_data}=1,{small_source}=3"
    args = [*SMALL_MODEL, "--data.path", "", "--data.mixture", mixture, "--data.micro_batch", "4",
            "--train.steps", "6", "--checkpoint.interval", "3", "--train.eval_interval", "3"]
    assert main(trainer_args(tmp_path / "a", None, *args, "--model.vocab_size", "512")) == 0
    run = tmp_path / "a" / "tiny"
    train = records(run, "train")
    assert {"loss/out", "loss/code", "tokens/out", "tokens/code"} <= set(train[-1])
    shares = np.array([train[-1]["tokens/out"], train[-1]["tokens/code"]])
    assert shares.sum() == train[-1]["tokens"] and abs(shares[0] - shares.sum() / 4) < 64  # one window
    repeats = records(run, "data")
    assert repeats and "epoch/code" in repeats[0]
    assert f"data: source code ran out at step {repeats[0]['step']}: it repeats" in capsys.readouterr().out
    evals = records(run, "eval")
    assert evals[-1]["val_loss"] == pytest.approx((evals[-1]["val_loss/out"] + 3 * evals[-1]["val_loss/code"]) / 4)
    # Resumed from step 3: every later step's losses are those of the run that went straight through.
    shutil.rmtree(run / "checkpoints" / "step-6")
    (run / "checkpoints" / "latest").write_text("step-3\n")
    assert main(trainer_args(tmp_path / "a", None, *args, "--model.vocab_size", "512", "--resume")) == 0
    resumed = {r["step"]: r for r in records(run, "train")[len(train):]}
    for record in train[3:]:
        again = resumed[record["step"]]
        assert all(again[k] == record[k] for k in record if k.startswith(("loss", "tokens/", "lr"))), record["step"]
    # Resumed with other weights: allowed, said, and every source goes on from its own position.
    assert main(trainer_args(tmp_path / "a", None, *args, "--model.vocab_size", "512", "--resume",
                             "--data.mixture", f"{prepared_data}=1,{small_source}=1", "--train.steps", "8")) == 0
    assert "data.mixture's weights differ from the checkpoint's" in capsys.readouterr().out
