"""Hugging Face MoE checkpoints in and out, per family: imported logits equal transformers' own, a sharded import
at world 2 (ep 2) and 4 (ep 2 x dp_shard 2) equals the single-process import, and after training under EP the
export loads in transformers with the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.distributed as dist
import transformers

from distributed import run_on_ranks
from equivalence import assert_layout, full_parameters, relative_error, small_config, split, train_steps
from hf_models import FAMILIES, save_tiny
from safetensors.torch import load_file, save_file

from moe_dist import export, train
from moe_dist.config import load_config
from moe_dist.data import prep
from moe_dist.data.tokenizer import EOS_TOKEN, train_tokenizer
from moe_dist.hf.config import config_from_hf, family_of, with_init_from
from moe_dist.hf.weights import Absent, Interleaved, import_model, open_init_weights, weight_sources
from moe_dist.model import Transformer
from moe_dist.parallel.materialize import filled_tensors, materialize, plain_name
from moe_dist.parallel.mesh import Runtime, build_mesh
from moe_dist.train import build_model, loss_fn
from runs import train_in_process, train_on_ranks, trainer_args

SEQ_LEN = 16
TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs."
TRAINING = {"data.seq_len": SEQ_LEN, "optim.lr": 1e-2, "optim.warmup_steps": 1, "optim.eps": 1e-4}
# The layout each family is saved in for the distributed runs: both save_pretrained forms and the fused one.
DISTRIBUTED_LAYOUTS = {"mixtral": "sharded", "qwen2_moe": "single", "qwen3_moe": "sharded", "olmoe": "fused",
                       "deepseek_v3": "quantized", "glm4_moe": "sharded", "gpt_oss": "quantized", "minimax_m2": "fused"}


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return out[0] if isinstance(out, tuple) else out.logits


def tokens(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (batch, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", ["single", "sharded", "fused"])
@pytest.mark.parametrize("family", FAMILIES)
def test_imported_logits_equal_transformers(tmp_path, family, layout):
    hf = save_tiny(family, tmp_path, layout)
    assert (tmp_path / "model.safetensors.index.json").is_file() == (layout == "sharded")
    model, cfg = import_model(tmp_path, {"data.seq_len": SEQ_LEN})
    assert relative_error(logits(model, tokens()), logits(hf, tokens())) <= 1e-5
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())
    # Export writes what save_pretrained wrote: the same keys, the same values.
    out = tmp_path / "export"
    out.mkdir()
    export.write_export(model, cfg, None, out, family_of(cfg), "float32")
    written = load_file(out / "model.safetensors")
    if layout != "fused":
        saved = {k: v for f in tmp_path.glob("model*.safetensors") for k, v in load_file(f).items()}
        assert written.keys() == saved.keys()
        assert all(torch.equal(written[k], saved[k]) for k in saved)


@pytest.mark.parametrize("family, override", [("olmoe", {"model.clip_qkv": 0.0}),
                                              ("qwen2_moe", {"moe.renormalize": True}),
                                              ("mixtral", {"model.rope_theta": 1e4})])
def test_the_family_features_matter(tmp_path, family, override):
    """The parity above would fail if clip_qkv, norm_topk_prob or rope_theta were dropped."""
    hf = save_tiny(family, tmp_path)
    model, _ = import_model(tmp_path, {"data.seq_len": SEQ_LEN, **override})
    assert relative_error(logits(model, tokens()), logits(hf, tokens())) > 1e-3


def test_the_qk_norm_is_per_head_for_qwen3(tmp_path):
    """Qwen3's q_norm / k_norm, normalising per head: transformers with them off gives other logits."""
    hf = save_tiny("qwen3_moe", tmp_path)
    model, _ = import_model(tmp_path, {"data.seq_len": SEQ_LEN})
    for layer in hf.model.layers:
        layer.self_attn.q_norm = torch.nn.Identity()
    assert relative_error(logits(model, tokens()), logits(hf, tokens())) > 1e-3


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_the_balance_loss_equals_transformers_times_its_coefficient(tmp_path, family):
    """One MoE layer, where transformers' pooling over layers changes nothing: our aux loss (with the converted
    coefficient, z-loss 0) is router_aux_loss_coef times transformers' load-balancing loss."""
    hf = save_tiny(family, tmp_path, num_hidden_layers=1, output_router_logits=True)
    model, _ = import_model(tmp_path, {"data.seq_len": SEQ_LEN})
    _, aux = model(tokens())
    assert aux.item() == pytest.approx(0.02 * hf(tokens()).aux_loss.item(), rel=1e-5)


def test_generate_and_export_read_a_hugging_face_dir(tmp_path):
    hf = save_tiny("qwen2_moe", tmp_path / "src", "sharded")
    model, cfg, tokenizer = export.load_for_inference(tmp_path / "src")
    assert relative_error(logits(model, tokens()), logits(hf, tokens())) <= 1e-5
    assert tokenizer is None and cfg.model.qkv_bias


def import_worker(rank, world_size, cases, global_batch, steps):
    """Per case: the first step's loss and full gradients, then `steps` training steps and the full weights."""
    results = []
    for cfg in cases:
        runtime = Runtime(rank, world_size, rank, torch.device("cpu"))
        model = build_model(cfg, build_mesh(cfg, world_size, "cpu"), runtime, open_init_weights(cfg).read)
        assert_layout(model, cfg.parallel.ep)
        per_rank = global_batch.shape[0] // world_size
        inputs, targets = split(global_batch[rank * per_rank:(rank + 1) * per_rank])
        out, aux = model(inputs)
        ce = loss_fn(out, targets)
        (ce + aux).backward()
        loss = ce.detach().clone()
        dist.all_reduce(loss)
        grads = {plain_name(n): p.grad.full_tensor() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        trained = train_steps(model, cfg, steps, rank, world_size)
        results.append((loss.item() / world_size, aux.item(), grads, [r.loss for r in trained],
                        full_parameters(model)))
    return results


def reference_import(cfg, global_batch: torch.Tensor, steps: torch.Tensor) -> tuple:
    """What import_worker gives, from the single-process import: the first step's loss, aux loss and gradients,
    then the losses of `steps` and the weights."""
    reference, _ = import_model(Path(cfg.train.init_from), TRAINING)
    inputs, targets = split(global_batch)
    out, aux = reference(inputs)
    ce = loss_fn(out, targets)
    (ce + aux).backward()
    grads = {name: param.grad for name, param in reference.named_parameters()}
    reference.zero_grad(set_to_none=True)
    losses = [r.loss for r in train_steps(reference, cfg, steps)]
    return ce.item(), aux.item(), grads, losses, full_parameters(reference)


@pytest.fixture(scope="module")
def distributed_cases(tmp_path_factory):
    """(per family of DISTRIBUTED_LAYOUTS: its config and reference_import, the global batch, the steps): one global
    batch of 8 sequences (4 or 2 a rank), so that both world sizes share the saved checkpoints and references."""
    torch.set_num_threads(1)  # as conftest sets for each test, which starts after this fixture
    root = tmp_path_factory.mktemp("hf")
    global_batch = torch.randint(0, 96, (8, SEQ_LEN + 1), generator=torch.Generator().manual_seed(3))
    steps = torch.randint(0, 96, (3, 1, 8, SEQ_LEN + 1), generator=torch.Generator().manual_seed(4))
    cases = []
    for family, layout in DISTRIBUTED_LAYOUTS.items():
        save_tiny(family, root / family, layout)
        cfg = config_from_hf(root / family, {**TRAINING, "parallel.ep": 2, "train.init_from": str(root / family)})
        cases.append((cfg, reference_import(cfg, global_batch, steps)))
    return cases, global_batch, steps


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_import_equals_single_process_then_exports_to_transformers(tmp_path, world_size, distributed_cases):
    cases, global_batch, steps = distributed_cases
    per_rank = run_on_ranks(import_worker, world_size, [cfg for cfg, _ in cases], global_batch, steps)

    for c, (cfg, (want_loss, want_aux, want_grads, want_steps, want_params)) in enumerate(cases):
        directory, family = Path(cfg.train.init_from), family_of(cfg)
        for rank, results in enumerate(per_rank):
            loss, got_aux, grads, losses, params = results[c]
            where = (directory.name, world_size, rank)
            assert abs(loss - want_loss) <= 1e-5 * want_loss and abs(got_aux - want_aux) <= 1e-5 * want_aux, where
            for name, want in want_grads.items():
                torch.testing.assert_close(grads[name], want, rtol=1e-5, atol=1e-5 * want.abs().max().item(),
                                           msg=f"{where} {name}")
            assert losses == pytest.approx(want_steps, rel=1e-5), where
            for name, want in want_params.items():
                torch.testing.assert_close(params[name], want, rtol=1e-4, atol=1e-4 * want.abs().max().item(),
                                           msg=f"{where} {name}")

        # The weights trained under EP, exported as the family's checkpoint: transformers gives our logits.
        trained = Transformer(cfg.model, cfg.moe)
        trained.load_state_dict({name: per_rank[0][c][4][name] for name in trained.state_dict()})
        out_dir = tmp_path / f"{directory.name}-export-{world_size}"
        out_dir.mkdir()
        export.write_export(trained.eval(), cfg, None, out_dir, family, "float32")
        hf, info = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32,
                                                                     output_loading_info=True)
        assert not any(info.values()), info  # no missing, unexpected or mismatched keys
        assert type(hf).__name__ == family.architecture
        assert relative_error(logits(hf.eval(), tokens()), logits(trained, tokens())) <= 1e-5
        # Correction biases (trained by the aux-free updates), sinks and biases: bit for bit in transformers.
        hf_state = hf.state_dict()
        for name, source in weight_sources(cfg, family).items():
            if name.endswith(("bias", "sinks")) and not isinstance(source, Absent):
                key = source.key if source.key in hf_state else source.alias
                stored = hf_state[key][..., source.offset::2] if isinstance(source, Interleaved) else hf_state[key]
                assert torch.equal(stored, dict(filled_tensors(trained))[name]), (family.model_type, name)


@pytest.mark.slow
def test_train_from_a_hf_dir_under_ep_then_export(tmp_path):
    """The user's path: prep with the checkpoint's tokenizer, two ranks with --train.init_from at ep 2, export
    --format hf, from_pretrained. The ranks are forked, not started by torchrun (which test_launch and
    test_checkpoint run): two interpreters' start less."""
    source = tmp_path / "qwen3"
    save_tiny("qwen3_moe", source, "sharded", vocab_size=320)
    train_tokenizer([TEXT], 300).save(str(source / "tokenizer.json"))
    (source / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS_TOKEN, "chat_template": "{{ x }}"}))
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": f"{i}: {TEXT}"}) + "\n" for i in range(200)))
    assert prep.main(["--input", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "data"), "--vocab-size", "320",
                      "--tokenizer", str(source)]) == 0
    run = tmp_path / "runs" / "q3"
    result = train_on_ranks(trainer_args(
        tmp_path / "runs", None, "--train.init_from", str(source), "--data.path", str(tmp_path / "data"),
        "--parallel.ep", "2", "--train.steps", "3", "--train.name", "q3", "--data.seq_len", str(SEQ_LEN),
        "--data.micro_batch", "2", "--optim.lr", "1e-2"), 2)
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = load_config(str(run / "config.toml"))
    assert (resolved.model.qk_norm, resolved.model.head_dim, resolved.moe.dense_layers) == ("head", 16, [0])
    assert resolved.train.init_from == str(source)
    assert (run / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    source_config = json.loads((source / "config.json").read_text())
    assert json.loads((run / "source_token_ids.json").read_text()) == {
        key: source_config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in source_config}

    out = tmp_path / "hf"
    assert export.main([str(run), "--out", str(out), "--format", "hf"]) == 0
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    ours, _, _ = export.load_for_inference(run)
    assert relative_error(logits(hf.eval(), tokens()), logits(ours, tokens())) <= 1e-5
    exported_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert exported_tokenizer.eos_token == EOS_TOKEN and exported_tokenizer.chat_template == "{{ x }}"

    # Resuming (here in one process) continues from the run's checkpoint: the checkpoint's weights are not read.
    for shard in source.glob("*.safetensors"):
        shard.rename(shard.with_suffix(".moved"))
    result = train_in_process(trainer_args(
        tmp_path / "runs", None, "--train.init_from", str(source), "--data.path", str(tmp_path / "data"),
        "--parallel.ep", "1", "--train.steps", "4", "--train.name", "q3", "--data.seq_len", str(SEQ_LEN),
        "--data.micro_batch", "4", "--optim.lr", "1e-2", "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout and "done: 4 steps" in result.stdout, result.stdout


def preflight(source: Path, runs: Path, capsys) -> str:
    """The trainer's own check with --train.init_from: exit 2 and one stderr line, which is returned."""
    capsys.readouterr()
    assert train.main(["--train.init_from", str(source), "--metrics.runs_dir", str(runs), "--data.seq_len",
                       str(SEQ_LEN), "--preflight"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert not runs.exists()  # nothing written: no run dir, no corpus cache
    return err


def rewrite(path: Path, change) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


QWEN2 = "model.layers.0.mlp."


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop(QWEN2 + "experts.3.up_proj.weight"), f"missing tensor {QWEN2}experts.3.up_proj.weight"),
    (lambda t: t.pop("model.layers.2.self_attn.k_proj.bias"), "missing tensor model.layers.2.self_attn.k_proj.bias"),
    (lambda t: t.update({QWEN2 + "shared_expert_gate.weight": torch.zeros(2, 32)}),
     f"tensor {QWEN2}shared_expert_gate.weight has shape [2, 32], expected [1, 32]"),
    (lambda t: t.update({QWEN2 + "experts.0.down_proj.weight": torch.zeros(24, 32)}),
     f"tensor {QWEN2}experts.0.down_proj.weight has shape [24, 32], expected [32, 24]"),
    (lambda t: t.update({"model.norm.weight": torch.ones(32, dtype=torch.int32)}),
     "tensor model.norm.weight has dtype I32"),
    (lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(12)}),
     "unexpected tensor model.layers.0.self_attn.q_norm.weight"),
])
def test_a_wrong_or_missing_tensor_is_one_line_naming_it(tmp_path, capsys, change, message):
    source = tmp_path / "qwen2"
    save_tiny("qwen2_moe", source)
    rewrite(source / "model.safetensors", change)
    err = preflight(source, tmp_path / "runs", capsys)
    assert message in err and str(source) in err, err


def test_a_checkpoint_without_its_tokenizer_is_one_line(tmp_path, capsys):
    save_tiny("mixtral", tmp_path / "mixtral")
    assert "has no tokenizer.json" in preflight(tmp_path / "mixtral", tmp_path / "runs", capsys)


def test_a_broken_sharded_checkpoint_is_one_line_naming_the_file(tmp_path, capsys):
    source = tmp_path / "mixtral"
    save_tiny("mixtral", source, "sharded")
    index = json.loads((source / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (source / shard).unlink()
    err = preflight(source, tmp_path / "runs", capsys)
    assert f"{source / shard}: missing" in err, err
    (source / "model.safetensors.index.json").unlink()
    assert "no model.safetensors or model.safetensors.index.json" in preflight(source, tmp_path / "runs", capsys)


def test_prep_with_a_checkpoints_tokenizer_uses_its_bos_and_eos(tmp_path):
    """As Mixtral's tokenizer_config.json asks: every document starts with <s> and ends with </s>."""
    source = tmp_path / "tok"
    source.mkdir()
    tokenizer = train_tokenizer([TEXT], 300)
    tokenizer.add_special_tokens(["<s>", "</s>"])
    tokenizer.save(str(source / "tokenizer.json"))
    (source / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                              "add_bos_token": True}))
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": f"{i}: {TEXT}"}) + "\n" for i in range(50)))
    assert prep.main(["--input", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "data"), "--vocab-size",
                      "320", "--tokenizer", str(source)]) == 0
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    assert (manifest["bos_id"], manifest["eos_id"]) == (bos, eos)
    shard = tmp_path / "data" / manifest["splits"]["train"]["shards"][0]["file"]
    ids = pa.ipc.open_file(shard).read_all()["tokens"].to_numpy()
    ends = np.flatnonzero(ids == eos)
    assert ids[0] == bos and len(ends) > 5 and (ids[ends[:-1] + 1] == bos).all()
    assert (ids == bos).sum() == len(ends)


def test_init_from_a_moe_dist_export(tmp_path):
    """train.init_from also takes a native export (our names, config.toml): e.g. to fine-tune a pre-trained run."""
    cfg = small_config(**{"moe.aux_free_bias": "true"})
    model = Transformer(cfg.model, cfg.moe, seed=3)
    model.layers[1].ffn.router.expert_bias[0] = 0.5  # a learned selection bias: not a weight, restarted at 0
    export.write_export(model, cfg, None, tmp_path, None, "float32")
    run = with_init_from("tiny", {"train.init_from": str(tmp_path), "data.seq_len": "32"})
    assert (run.model, run.moe) == (cfg.model, cfg.moe)
    with torch.device("meta"):
        fresh = Transformer(run.model, run.moe)
    materialize(fresh, torch.device("cpu"), open_init_weights(run).read)
    for (name, want), (_, got) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(got, want), name
