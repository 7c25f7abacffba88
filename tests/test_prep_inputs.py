"""Prep's inputs and the data checks before training: chats found in one rendering, records with nothing to learn,
the bounds on what one step reads, one line for bad input and signals, nothing left behind by a refusal."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from moe_dist import train
from moe_dist.config import ConfigError, load_config
from moe_dist.data import DataError, corpus, prep
from moe_dist.data.chat import EXACT_ANSWERS, ChatRenderer
from moe_dist.data.flags import LOSS
from moe_dist.data.loader import check_compatible
from moe_dist.data.prep import RecordOptions, prepare
from moe_dist.data.tokenizer import EOS_TOKEN, train_tokenizer
from runs import REPO, SMALL_MODEL, trainer_args

VOCAB = 300


def chat(turns: int) -> list[dict]:
    return [{"role": ("user", "assistant")[i % 2], "content": f"turn {i}: {'why?' if i % 2 == 0 else 'because.'}"}
            for i in range(turns)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def one_line_refusal(capsys, argv: list[str]) -> str:
    """prep's main refuses argv with exit 2 and one line on stderr (after progress lines, when it refuses what it
    finds tokenizing), which is returned."""
    capsys.readouterr()
    assert prep.main(argv) == 2
    *progress, error = capsys.readouterr().err.splitlines()
    assert all(line.startswith(("prep: training", "prep: tokenizing")) for line in progress), progress
    return error


# --- chats: every answer from one rendering ------------------------------------------------------------------

# As Llama's and Mistral's: the system message apart, a loop over the rest (a slice).
SYSTEM_FIRST = ("{{ bos_token }}{% if messages[0].role == 'system' %}{% set rest = messages[1:] %}"
                "[SYS {{ messages[0].content }}]{% else %}{% set rest = messages %}{% endif %}"
                "{% for m in rest %}<{{ m.role }}>{{ m.content | trim }}{% if m.role == 'assistant' %}{{ eos_token }}"
                "{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
# Looks ahead before a turn's last text: where the loop fetched a message is not where the turn before it ended.
PEEKING = ("{% for m in messages %}{{ m.role }}: {{ m.content }}{% if loop.last %}{% endif %}{{ '\\n' }}{% endfor %}"
           "{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.mark.parametrize("template", [None, SYSTEM_FIRST])
def test_a_long_chat_is_rendered_as_often_at_a_thousand_turns_as_at_a_hundred(monkeypatch, template):
    """Each rendering is linear in the chat; a count that grows with the turns (two per answer, as before, and as
    still for chats of up to EXACT_ANSWERS answers) made prep quadratic: a 10,000-turn chat ran for minutes."""
    calls = []
    render = ChatRenderer.render
    monkeypatch.setattr(ChatRenderer, "render", lambda self, *args: calls.append(1) or render(self, *args))
    renderer = ChatRenderer(template, "<s>", EOS_TOKEN)
    counts = []
    for turns in (100, 1000):
        calls.clear()
        renderer.example([{"role": "system", "content": "Be brief."}, *chat(turns)], "x")
        counts.append(len(calls))
    assert counts[0] == counts[1] <= 5, counts


@pytest.mark.parametrize("template", [None, SYSTEM_FIRST, PEEKING])
def test_the_answers_of_one_rendering_are_those_of_the_chat_rendered_turn_by_turn(template):
    renderer = ChatRenderer(template, "<s>", EOS_TOKEN)
    messages = [{"role": "system", "content": "Be brief."}, *chat(2 * EXACT_ANSWERS + 6)]
    example = renderer.example(messages, "x")
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert example.spans == [renderer._span(messages, i, example.text, "x") for i in answers]
    assert example.text[slice(*example.spans[0])].startswith("turn 1: because.")


# Renders a middle answer otherwise once the chat has grown past it (as templates that strip earlier answers'
# reasoning do): earlier turns change with later ones, but the first and last answers do not show it.
REWRITING = ("{% for m in messages %}{{ m.role }}: {% if m.role == 'assistant' and messages|length > loop.index0 + 1 "
             "and loop.index0 > 1 %}[old]{% endif %}{{ m.content }}\n{% endfor %}"
             "{% if add_generation_prompt %}assistant: {% endif %}")


def test_a_template_that_rewrites_earlier_answers_is_refused():
    renderer = ChatRenderer(REWRITING, "<s>", EOS_TOKEN)
    with pytest.raises(DataError, match="does not render this chat turn by turn"):
        renderer.example(chat(6), "x")


# --- records with nothing to learn ---------------------------------------------------------------------------

def prepare_chats(tmp_path: Path, records: list[dict], **options) -> Path:
    return prepare([write_jsonl(tmp_path / "chats.jsonl", records)], tmp_path / "data", VOCAB, workers=1,
                   val_fraction=0.2, records=RecordOptions(chat=True, **options))


PAIR = {"prompt": "Two plus two?", "completion": " Four."}


def test_a_record_with_no_target_left_is_dropped_and_counted(tmp_path):
    answer_cut_off = {"messages": [{"role": "user", "content": " ".join(f"q{i}" for i in range(60))},
                                   {"role": "assistant", "content": "No."}]}
    out = prepare_chats(tmp_path, [answer_cut_off] * 3 + [{"prompt": "", "completion": ""}] + [PAIR] * 5,
                        max_tokens=24)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"]["no_target"] == 4 and manifest["skipped"]["truncated"] == 0
    splits = manifest["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == 5
    assert splits["train"]["targets"] > 0 and splits["val"]["targets"] > 0


def test_data_with_no_target_at_all_is_refused_at_prep(tmp_path, capsys):
    source = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "", "completion": ""}] * 3)
    err = one_line_refusal(capsys, ["--chat", "--input", str(source), "--vocab-size", str(VOCAB), "--out",
                                    str(tmp_path / "data"), "--workers", "1"])
    assert f"data: {source}: no record has a target token left (3 dropped with no target token left)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]


def zero_flags(shard: Path) -> None:
    """Rewrite a shard with no LOSS flag, at its size (the size is what training start verifies)."""
    reader = pa.ipc.open_file(pa.memory_map(str(shard)))
    batch, schema = reader.get_batch(0), reader.schema
    tokens, flags = batch.column(0).to_numpy(), batch.column(1).to_numpy() & ~np.uint8(LOSS)
    size = shard.stat().st_size
    del batch, reader
    with pa.ipc.new_file(str(shard), schema) as writer:
        writer.write_batch(pa.record_batch([pa.array(tokens), pa.array(flags)], schema=schema))
    assert shard.stat().st_size == size


def test_training_start_refuses_a_split_without_a_target(tmp_path):
    out = prepare_chats(tmp_path, [PAIR] * 10)
    check_compatible(out, VOCAB, 64, 1, 1)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["val"]["targets"] = 0
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=rf"^data: split 'val' of {out} has no target token"):
        check_compatible(out, VOCAB, 64, 1, 1)
    # Prepared before prep counted targets: the flags tell.
    for split in manifest["splits"].values():
        del split["targets"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    check_compatible(out, VOCAB, 64, 1, 1)
    zero_flags(out / manifest["splits"]["val"]["shards"][0]["file"])
    with pytest.raises(DataError, match=rf"^data: split 'val' of {out} has no target token"):
        check_compatible(out, VOCAB, 64, 1, 1)


# --- what one step reads -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> Path:
    """Documents of vocab 512 (the trainer tests' model): a few global batches of 2 x (64 + 1) tokens in val,
    many more in train."""
    root = tmp_path_factory.mktemp("documents")
    text = " ".join(f"word{i % 97} and{i % 13}" for i in range(2000))
    source = write_jsonl(root / "docs.jsonl", [{"text": text[i:i + 400]} for i in range(0, len(text), 400)])
    return prepare([source], root / "data", 512, workers=1, val_fraction=0.1)


def test_a_training_step_reads_no_window_twice(documents):
    manifest = json.loads((documents / "manifest.json").read_text())
    train_batches = (manifest["splits"]["train"]["tokens"] - 1) // 64 // 2
    check_compatible(documents, 512, 64, 2, 1, grad_accum=train_batches)
    with pytest.raises(DataError, match=rf"^data: train.grad_accum = 1,000,000,000 must be at most {train_batches}, "
                                        rf"the global batches of 1 ranks x 2 sequences in split 'train'"):
        check_compatible(documents, 512, 64, 2, 1, grad_accum=10**9)


def test_a_huge_grad_accum_is_refused_before_the_run_dir_is_written(tmp_path, capsys, documents):
    argv = trainer_args(tmp_path / "runs", documents, *SMALL_MODEL, "--data.micro_batch", "2",
                        "--train.grad_accum", "1000000000")
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data: train.grad_accum = 1,000,000,000 must be at most" in err, err
    assert not (tmp_path / "runs").exists()


def test_a_huge_eval_steps_reads_the_val_split_once(tmp_path, capsys, documents):
    argv = trainer_args(tmp_path / "runs", documents, *SMALL_MODEL, "--data.micro_batch", "2", "--train.steps", "1",
                        "--train.eval_steps", "1000000000")
    assert train.main(argv) == 0
    assert "train.eval_steps = 1000000000 is more than the " in capsys.readouterr().out


def test_a_huge_lr_is_refused_naming_its_range():
    with pytest.raises(ConfigError, match=r"^config: optim.lr = 1e\+308 must be in \(0, 1\]$"):
        load_config("tiny", {"optim.lr": "1e308"})


# --- one line for bad chat input -----------------------------------------------------------------------------

def tokenizer_with_template(root: Path, template: str) -> Path:
    root.mkdir()
    train_tokenizer(["hello there"], VOCAB).save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS_TOKEN, "chat_template": template}))
    return root / "tokenizer.json"


@pytest.mark.parametrize("record, template, message", [
    ({"messages": [{"role": "user", "content": "\ud800"}, {"role": "assistant", "content": "Hm."}]}, None,
     "message 0's content holds a lone surrogate (\\ud800 at character 0), which is not text"),
    ({"prompt": "Say \udfff", "completion": "No."}, None,
     '"prompt" holds a lone surrogate (\\udfff at character 4), which is not text'),
    (PAIR | {"messages": chat(2)}, "{{ 1 // 0 }}",
     "the tokenizer's chat template refused this chat (ZeroDivisionError: integer division or modulo by zero)"),
])
def test_bad_chat_input_is_one_line_naming_file_and_line(tmp_path, capsys, record, template, message):
    source = write_jsonl(tmp_path / "chats.jsonl", [PAIR, record])
    argv = ["--chat", "--input", str(source), "--vocab-size", str(VOCAB), "--out", str(tmp_path / "data"),
            "--workers", "1"]
    if template is not None:
        argv += ["--tokenizer", str(tokenizer_with_template(tmp_path / "tok", template))]
    assert f"data: {source}:2: {message}" in one_line_refusal(capsys, argv)
    assert not (tmp_path / "data").exists()


def test_a_document_with_a_lone_surrogate_is_one_line(tmp_path, capsys):
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": "fine"}, {"text": "a\ud800"}])
    err = one_line_refusal(capsys, ["--input", str(source), "--vocab-size", str(VOCAB), "--out",
                                    str(tmp_path / "data")])
    assert f"data: {source}:2: field 'text' holds a lone surrogate (\\ud800 at character 1)" in err


# --- nothing left behind ---------------------------------------------------------------------------------------

def test_a_refused_vocab_size_leaves_no_default_corpus_behind(tmp_path):
    with pytest.raises(DataError, match="vocab_size = 10 is too small"):
        corpus.default_corpus(tmp_path / "_corpus", 10)
    assert not (tmp_path / "_corpus").exists()


def test_a_failed_default_corpus_build_removes_its_source(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise DataError("data: refused")

    monkeypatch.setattr(corpus, "stdlib_texts", lambda root, cap: iter(["x = 1\n"]))
    monkeypatch.setattr(corpus, "prepare", refuse)
    with pytest.raises(DataError, match="refused"):
        corpus.default_corpus(tmp_path, VOCAB)
    assert not list(tmp_path.glob("*.jsonl"))


def test_a_full_disk_is_one_line_naming_the_file_and_removes_the_staging(tmp_path, capsys, monkeypatch):
    def full(path, schema):  # as Arrow raises it: an errno, no file name
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(prep.pa.ipc, "new_file", full)
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": "some text"}] * 4)
    err = one_line_refusal(capsys, ["--input", str(source), "--vocab-size", str(VOCAB), "--out",
                                    str(tmp_path / "data"), "--workers", "1"])
    assert f"data: {tmp_path / '.data.prep-tmp' / 'stream-00000.arrow'}: No space left on device" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


def test_sigterm_to_prep_and_its_workers_is_one_line(tmp_path):
    """The whole process group signalled, as a job scheduler or `timeout` does, while the workers tokenize."""
    text = " ".join(f"w{i % 1000}" for i in range(300_000))
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": text}] * 5)
    tokenizer = tmp_path / "tokenizer.json"
    train_tokenizer([text[:10_000]], VOCAB).save(str(tokenizer))
    proc = subprocess.Popen([sys.executable, "-m", "moe_dist.data.prep", "--input", str(source), "--vocab-size",
                             str(VOCAB), "--tokenizer", str(tokenizer), "--out", str(tmp_path / "data"),
                             "--workers", "2"], cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True)
    staging = tmp_path / ".data.prep-tmp"
    deadline = time.monotonic() + 60
    while not (staging / "tokenizer.json").exists():  # the workers start right after
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.01)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.splitlines()[-1] == "prep: stopped by SIGTERM; nothing half-written was kept", err
    assert all(line.startswith("prep: ") for line in err.splitlines()), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "tokenizer.json"]
