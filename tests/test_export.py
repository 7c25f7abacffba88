"""Export: the consolidated safetensors and the Hugging Face Mixtral directory reproduce the model's logits."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from moe_dist import export
from moe_dist.checkpoint import seal
from moe_dist.config import load_config, to_toml
from moe_dist.data.tokenizer import load_tokenizer, train_tokenizer
from moe_dist.hf.config import FAMILIES, config_from_hf
from moe_dist.model import Transformer

# A Mixtral-shaped model (every layer MoE) small enough to build, save and export in well under a second.
TINY = {"model.vocab_size": "320", "model.dim": "64", "model.n_layers": "2", "model.n_heads": "4",
        "model.n_kv_heads": "2", "model.max_seq_len": "64", "data.seq_len": "64", "moe.num_experts": "4",
        "moe.top_k": "2", "moe.expert_hidden": "48", "moe.first_k_dense": "0"}
TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n" * 20


def make_run(root: Path, expert_bias: list[float] | None = None, **overrides: str) -> tuple[Path, Transformer]:
    """A run dir in the trainer's layout holding one DCP checkpoint (step-3, `latest`) of a random model."""
    cfg = load_config("tiny", {**TINY, **overrides})
    model = Transformer(cfg.model, cfg.moe)
    with torch.no_grad():  # norms away from 1, so that swapping two of them would show in the logits
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
        if expert_bias is not None:
            model.layers[-1].ffn.router.expert_bias.copy_(torch.tensor(expert_bias))
    step = root / "checkpoints" / "step-3"
    with warnings.catch_warnings():  # that DCP saves from one process, which is the point
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": model.state_dict()}, checkpoint_id=step, no_dist=True)
    (root / "config.toml").write_text(to_toml(cfg))
    shutil.copyfile(root / "config.toml", step / "config.toml")
    seal(step, 3, world_size=1)
    (root / "checkpoints" / "latest").write_text("step-3")
    train_tokenizer([TEXT], 300).save(str(root / "tokenizer.json"))
    return root, model.eval()


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)[0]


def test_load_for_inference_from_run_step_and_export_dirs(tmp_path):
    run, model = make_run(tmp_path / "run")
    assert export.resolve_checkpoint(run) == run / "checkpoints" / "step-3"
    assert export.main([str(run), "--out", str(tmp_path / "out")]) == 0
    tokens = torch.randint(0, 320, (2, 16))
    for path in (run, run / "checkpoints" / "step-3", tmp_path / "out"):
        loaded, cfg, tokenizer = export.load_for_inference(path)
        assert cfg.model.dim == 64 and tokenizer is not None and not loaded.training
        torch.testing.assert_close(logits(loaded, tokens), logits(model, tokens), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_consolidated_export_reproduces_logits(tmp_path, dtype):
    run, model = make_run(tmp_path / "run", [0.01, -0.02, 0.0, 0.03], **{"moe.aux_free_bias": "true"})
    out = tmp_path / "out"
    assert export.main([str(run), "--out", str(out), "--dtype", dtype]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.toml", "model.safetensors", "tokenizer.json"]
    # safetensors writes 0600; an export gets the mode of any file written under the user's umask.
    assert (out / "model.safetensors").stat().st_mode == (out / "config.toml").stat().st_mode

    state = load_file(out / "model.safetensors")
    assert state.keys() == model.state_dict().keys()
    assert state["layers.1.ffn.experts.w1"].shape == (4, 64, 48)
    assert state["tok_embeddings.weight"].dtype == getattr(torch, dtype)
    assert state["layers.1.ffn.router.expert_bias"].dtype == torch.float32  # buffers are not rounded
    cfg = load_config(str(out / "config.toml"))
    fresh = Transformer(cfg.model, cfg.moe).eval()
    fresh.load_state_dict(state)
    tokens = torch.randint(0, 320, (2, 24))
    if dtype == "float32":
        torch.testing.assert_close(logits(fresh, tokens), logits(model, tokens), rtol=0, atol=0)
    else:
        assert (logits(fresh, tokens) - logits(model, tokens)).abs().max() < 0.05


@pytest.mark.parametrize("overrides", [{}, {"moe.top_k": "1", "model.n_kv_heads": "4", "moe.aux_free_bias": "true"}])
def test_hf_export_matches_transformers_mixtral(tmp_path, overrides):
    transformers = pytest.importorskip("transformers")
    run, model = make_run(tmp_path / "run", **overrides)
    out = tmp_path / "hf"
    assert export.main([str(run), "--out", str(out), "--format", "hf"]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in load_file(out / "model.safetensors")
    back = config_from_hf(out)  # the config survives the round trip, aux coefficient converted and back
    assert (back.model, back.moe.num_experts, back.moe.top_k, back.moe.expert_hidden) == (
        model.cfg, 4, int(overrides.get("moe.top_k", 2)), 48)
    assert back.moe.aux_loss_coef == pytest.approx(load_config(str(run / "config.toml")).moe.aux_loss_coef)

    hf = transformers.MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.randint(0, 320, (2, 40))
    diff = (logits(model, tokens) - hf(tokens).logits.detach()).abs().max().item()
    assert diff < 1e-4, diff

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer.encode("lazy dog") == load_tokenizer(run / "tokenizer.json").encode("lazy dog").ids
    assert hf.config.eos_token_id == hf_tokenizer.eos_token_id == 0


@pytest.mark.parametrize("overrides, key", [
    ({"moe.shared_expert_hidden": "32"}, "moe.shared_expert_hidden"),
    ({"moe.first_k_dense": "1"}, "moe.first_k_dense"),
    ({"moe.every_n_layers": "2"}, "moe.every_n_layers"),
    ({"moe.capacity_factor": "1.25"}, "moe.capacity_factor"),
    ({"moe.score_func": "sigmoid", "model.attention_sinks": "true"}, "model.attention_sinks"),
    ({"moe.renormalize": "false"}, "moe.renormalize"),
    ({"moe.num_experts": "0"}, "moe.num_experts"),
    ({"moe.n_group": "2", "moe.topk_group": "1"}, "moe.topk_group"),
    ({"moe.routed_scaling_factor": "2"}, "moe.routed_scaling_factor"),
])
def test_hf_export_of_unmappable_config_names_the_key(tmp_path, capsys, overrides, key):
    run, _ = make_run(tmp_path / "run", **overrides)
    assert export.main([str(run), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and key in err and "--format hf" in err
    assert not (tmp_path / "hf").exists()


def test_hf_blocker_sees_a_learned_selection_bias():
    cfg = load_config("tiny", {**TINY, "moe.aux_free_bias": "true"})
    model = Transformer(cfg.model, cfg.moe)
    assert export.hf_blocker(cfg, model, FAMILIES["mixtral"]) is None
    model.layers[0].ffn.router.expert_bias[2] = 0.001
    assert "moe.aux_free_bias" in export.hf_blocker(cfg, model, FAMILIES["mixtral"])


def test_errors_are_one_line_exit_2(tmp_path, capsys):
    run, _ = make_run(tmp_path / "run")
    no_latest = tmp_path / "no_latest"
    (no_latest / "checkpoints").mkdir(parents=True)
    dangling = tmp_path / "dangling"
    (dangling / "checkpoints").mkdir(parents=True)
    (dangling / "checkpoints" / "latest").write_text("step-9")
    (tmp_path / "empty").mkdir()
    cases = {tmp_path / "missing": "no such directory", no_latest: "no 'latest'", dangling: "step-9",
             tmp_path / "empty": "not a run dir"}
    for path, words in cases.items():
        assert export.main([str(path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and str(path) in err, err
    (run / "checkpoints" / "step-3" / "config.toml").write_text(
        to_toml(load_config("tiny", {**TINY, "model.dim": "32"})))
    assert export.main([str(run), "--out", str(tmp_path / "out")]) == 2
    assert "config.toml is corrupt (its CRC-32" in capsys.readouterr().err
    seal(run / "checkpoints" / "step-3", 3, world_size=1)  # consistent files, but not of this model
    assert export.main([str(run), "--out", str(tmp_path / "out")]) == 2
    assert "cannot load its weights" in capsys.readouterr().err
