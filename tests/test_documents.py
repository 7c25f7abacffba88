"""Documents and packing: a packed window's logits equal each document run alone; the loader's document masks,
positions and loss targets; the masked loss summed over the global batch equals one process at world 2 and 4."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distributed import run_on_ranks
from equivalence import assert_layout, relative_error, small_config
from moe_dist.data import DataError
from moe_dist.data.chat import ChatRenderer, Example, to_example
from moe_dist.data.flags import IGNORE, LOSS
from moe_dist.data.loader import Batch, DataLoader, check_compatible
from moe_dist.data.prep import RecordOptions, _answer_flags, prepare
from moe_dist.data.prep import main as prep_main
from moe_dist.data.tokenizer import EOS_TOKEN, train_tokenizer
from moe_dist.model import Transformer
from moe_dist.parallel.materialize import plain_name
from moe_dist.parallel.mesh import Runtime, build_mesh
from moe_dist.train import accumulate_gradients, build_model
from runs import REPO

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs.",
             "How vexingly quick daft zebras jump!", "Sphinx of black quartz, judge my vow."]


def test_a_packed_window_equals_each_document_alone():
    cfg = small_config()
    model = Transformer(cfg.model, cfg.moe).eval()
    lengths = [5, 12, 9, 6]  # 32 tokens: data.seq_len
    docs = [torch.randint(0, cfg.model.vocab_size, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    tokens = torch.cat(docs)[None]
    segments = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed, _ = model(tokens, segments=segments, positions=positions)
        alone = torch.cat([model(doc[None])[0] for doc in docs], dim=1)
        unmasked, _ = model(tokens)
    assert relative_error(packed, alone) <= 1e-5
    assert relative_error(unmasked, alone) > 1e-2  # without the mask the documents see each other


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def documents_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    rng = np.random.default_rng(0)
    write_jsonl(root / "docs.jsonl", [{"text": " ".join(rng.choice(SENTENCES, rng.integers(1, 4)))}
                                      for _ in range(300)])
    return prepare([root / "docs.jsonl"], root / "data", 300, workers=1)


def test_the_loader_masks_documents_and_restarts_positions(documents_dir):
    seq_len = 48
    loader = DataLoader(documents_dir, "train", seq_len, 4, document_mask=True, restart_positions=True)
    plain = DataLoader(documents_dir, "train", seq_len, 4)
    eos = json.loads((documents_dir / "manifest.json").read_text())["eos_id"]
    for _ in range(5):
        batch, unmasked = next(loader), next(plain)
        assert torch.equal(batch.inputs, unmasked.inputs)
        after_eos = batch.inputs == eos  # the target after an EOS starts the next document
        assert torch.equal(batch.targets == IGNORE, after_eos)
        assert torch.equal(unmasked.targets[:, :-1], batch.inputs[:, 1:])  # without the mask every target counts
        starts = torch.cat([torch.zeros_like(after_eos[:, :1]), after_eos[:, :-1]], 1)
        assert torch.equal(batch.segments - batch.segments[:, :1], torch.cumsum(starts.long(), 1))
        for row in range(4):
            for t in range(seq_len):
                first = max([0] + [i for i in range(t + 1) if starts[row, i]])
                assert batch.positions[row, t] == t - first


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "Paris."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two plus two?"},
                  {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And three plus three?"},
                  {"role": "assistant", "content": "Six."}]},
    {"prompt": "Complete: the quick brown", "completion": " fox."},
]


def tokenizer_dir(root, template: str | None):
    """A tokenizer.json with the chat markers as special tokens, and a tokenizer_config.json (with a template)."""
    root.mkdir()
    tokenizer = train_tokenizer(SENTENCES * 5 + [json.dumps(CHATS)], 300)
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tokenizer.save(str(root / "tokenizer.json"))
    config = {"eos_token": EOS_TOKEN, **({"chat_template": template} if template else {})}
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return root, tokenizer


@pytest.mark.parametrize("template, answers", [
    (CHAT_TEMPLATE, ["Paris.<|im_end|>\n", "Four.<|im_end|>\nSix.<|im_end|>\n", f" fox.{EOS_TOKEN}"]),
    (None, [f"Paris.{EOS_TOKEN}\n", f"Four.{EOS_TOKEN}\nSix.{EOS_TOKEN}\n", f" fox.{EOS_TOKEN}"]),
])
def test_chats_are_rendered_with_the_template_and_only_answers_count(tmp_path, template, answers):
    source, tokenizer = tokenizer_dir(tmp_path / "tok", template)
    write_jsonl(tmp_path / "chats.jsonl", CHATS * 20)
    out = prepare([tmp_path / "chats.jsonl"], tmp_path / "data", 320, tokenizer=source, workers=1, val_fraction=0.1,
                  records=RecordOptions(chat=True))
    loader = DataLoader(out, "val", 128, 2, document_mask=True)  # whole conversations, in order
    batch = next(loader)
    seen = set()
    for row in range(2):
        for segment in batch.segments[row].unique():
            inside = batch.segments[row] == segment
            counted = batch.targets[row][inside & (batch.targets[row] != IGNORE)].tolist()
            text = tokenizer.decode(batch.inputs[row][inside].tolist(), skip_special_tokens=False)
            if counted:  # a conversation (padding has no targets): whole, its answers and nothing else counted
                assert text.startswith(("<|im_start|>" if template else "<|", "Complete")), text
                seen.add(tokenizer.decode(counted, skip_special_tokens=False))
    assert seen == set(answers)


def test_an_answer_token_that_starts_in_the_prompt_counts(tmp_path):
    """Byte-level BPE puts the space before "Paris" into its token: that token starts in the prompt."""
    _, tokenizer = tokenizer_dir(tmp_path / "tok", None)
    text = "Answer: Paris"
    encoding = tokenizer.encode(text, add_special_tokens=False)
    flags = _answer_flags(encoding, Example(text, [(len("Answer: "), len(text))]))
    counted = [i for i, f in zip(encoding.ids, flags) if f & LOSS]
    assert "Paris" in tokenizer.decode(counted) and "Answer" not in tokenizer.decode(counted)


def spawn_masked_step(rank, world_size, cfgs, micro_batches):
    """Each layout's gradients and loss of one accumulated step on this rank's rows of every micro-batch."""
    results = []
    for cfg in cfgs:
        model = build_model(cfg, build_mesh(cfg, world_size, "cpu"), Runtime(rank, world_size, rank,
                                                                             torch.device("cpu")))
        assert_layout(model, cfg.parallel.ep)
        rows = micro_batches[0].inputs.shape[0] // world_size
        mine = [Batch(*(t if t is None else t[rank * rows:(rank + 1) * rows] for t in b)) for b in micro_batches]
        result = accumulate_gradients(model, mine)
        grads = {plain_name(n): p.grad.full_tensor() for n, p in model.named_parameters()}
        results.append((result.loss, result.aux_loss, grads))
    return results


def masked_micro_batches(cfg, world_size: int) -> list[Batch]:
    """Two micro-batches whose loss masks leave every rank a different count (rank r keeps about (r+1)/(W+1) of its
    targets), with documents packed in every row."""
    gen = torch.Generator().manual_seed(world_size)
    batches = []
    for _ in range(2):
        rows, seq = 2 * world_size, cfg.data.seq_len
        inputs = torch.randint(0, cfg.model.vocab_size, (rows, seq), generator=gen)
        keep = torch.rand(rows, seq, generator=gen) < ((torch.arange(rows) // 2 + 1) / (world_size + 1))[:, None]
        targets = torch.where(keep, torch.randint(0, cfg.model.vocab_size, (rows, seq), generator=gen), IGNORE)
        segments = torch.cumsum(torch.rand(rows, seq, generator=gen) < 0.1, 1)
        batches.append(Batch(inputs, targets, segments, None))
    return batches


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_the_masked_loss_over_ranks_equals_one_process(world_size):
    cfgs = [small_config(**{"parallel.ep": str(ep), "train.grad_accum": "2"}) for ep in (1, 2)]
    micro_batches = masked_micro_batches(cfgs[0], world_size)
    counts = [(b.targets[2 * r:2 * r + 2] != IGNORE).sum().item() for b in micro_batches for r in range(world_size)]
    assert len(set(counts)) == len(counts)  # every rank and micro-batch holds another number of targets
    per_rank = run_on_ranks(spawn_masked_step, world_size, cfgs, micro_batches)
    for c, cfg in enumerate(cfgs):
        reference = Transformer(cfg.model, cfg.moe, seed=cfg.train.seed)
        want = accumulate_gradients(reference, micro_batches)
        for rank, results in enumerate(per_rank):
            loss, aux, grads = results[c]
            where = (world_size, cfg.parallel.ep, rank)
            assert abs(loss - want.loss) <= 1e-5 * want.loss and abs(aux - want.aux_loss) <= 1e-5 * want.aux_loss, where
            for name, param in reference.named_parameters():
                torch.testing.assert_close(grads[name], param.grad, rtol=1e-5,
                                           atol=1e-5 * param.grad.abs().max().item(), msg=f"{where} {name}")


@pytest.mark.parametrize("record, message", [
    ({"text": "a document, not a chat"}, 'no "messages" list (a chat) or "prompt" and "completion" (a pair)'),
    ({"messages": [{"role": "robot", "content": "beep"}]}, 'message 0 has role "robot" (roles: system, user, '
                                                           'assistant)'),
    ({"messages": [{"role": "user", "content": "Hello?"}]}, "no assistant turn, so nothing to learn from"),
    ({"messages": [{"role": "user"}]}, 'message 0 has no string "content"'),
])
def test_a_bad_chat_record_is_one_line_naming_the_line_or_skipped(tmp_path, capsys, record, message):
    source, _ = tokenizer_dir(tmp_path / "tok", CHAT_TEMPLATE)
    write_jsonl(tmp_path / "chats.jsonl", CHATS * 10 + [record] + CHATS * 10)
    argv = ["--chat", "--input", str(tmp_path / "chats.jsonl"), "--tokenizer", str(source), "--vocab-size", "320",
            "--out", str(tmp_path / "data"), "--workers", "1"]
    assert prep_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'chats.jsonl'}:31: {message}" in err, err
    assert not (tmp_path / "data").exists()
    assert prep_main(argv + ["--bad-records", "skip"]) == 0
    assert "1 bad records skipped" in capsys.readouterr().err
    assert json.loads((tmp_path / "data" / "manifest.json").read_text())["skipped"]["bad"] == 1


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_overlong_conversations_are_truncated_or_dropped_and_counted(tmp_path, capsys, overlong):
    source, tokenizer = tokenizer_dir(tmp_path / "tok", CHAT_TEMPLATE)
    write_jsonl(tmp_path / "chats.jsonl", CHATS * 20)
    out = prepare([tmp_path / "chats.jsonl"], tmp_path / "data", 320, tokenizer=source, workers=1,
                  records=RecordOptions(chat=True, max_tokens=48, overlong=overlong))  # cut answers keep a token
    renderer = ChatRenderer(CHAT_TEMPLATE, "", EOS_TOKEN)
    lengths = [len(tokenizer.encode(to_example(json.dumps(c).encode(), "", renderer).text,
                                    add_special_tokens=False).ids) for c in CHATS]
    skipped = json.loads((out / "manifest.json").read_text())["skipped"]
    longer = skipped["truncated" if overlong == "truncate" else "dropped"]
    assert longer == 20 * sum(n > 48 for n in lengths) > 0
    assert skipped["dropped" if overlong == "truncate" else "truncated"] == 0 and skipped["no_target"] == 0
    assert f"{longer} {'truncated to' if overlong == 'truncate' else 'dropped for exceeding'} --max-tokens" in (
        capsys.readouterr().err)
    loader = DataLoader(out, "train", 47, 2, document_mask=True)  # every conversation fits a window of 48
    assert next(loader).inputs.shape == (2, 47)
    if overlong == "truncate":
        with pytest.raises(DataError, match=r"holds a conversation of 48 tokens, more than data.seq_len \+ 1 = 17; "
                                            r"prepare it with --max-tokens 17"):
            DataLoader(out, "train", 16, 2, document_mask=True)


def test_the_bundled_chat_example_prepares(tmp_path, capsys):
    """The README's worked example, with a tokenizer trained on the chats themselves (built-in template)."""
    assert prep_main(["--chat", "--input", str(REPO / "examples" / "chat.jsonl"), "--vocab-size", "512",
                      "--max-tokens", "129", "--val-fraction", "0.1", "--out", str(tmp_path / "chat")]) == 0
    manifest = json.loads((tmp_path / "chat" / "manifest.json").read_text())
    assert manifest["kind"] == "chat" and manifest["splits"]["train"]["documents"] > 90
    assert not any(manifest["skipped"].values()), manifest["skipped"]
    check_compatible(tmp_path / "chat", 512, 128, 2, 2)
