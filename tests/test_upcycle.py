"""Dense Hugging Face models (and dense moe_dist exports) in: imported dense, or upcycled into an MoE whose logits
equal the dense model's at every layout, until noise or training tells the copies apart."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from distributed import run_on_ranks
from equivalence import full_parameters, relative_error, train_steps
from hf_models import save_tiny

from moe_dist import export, params, train
from moe_dist.config import ConfigError, load_config
from moe_dist.data import prep
from moe_dist.data.tokenizer import train_tokenizer
from moe_dist.hf.config import config_from_hf, with_init_from
from moe_dist.hf.weights import import_model, open_init_weights
from moe_dist.memory import meta_model
from moe_dist.model import Transformer, moe_layers
from moe_dist.parallel.materialize import materialize
from moe_dist.parallel.mesh import Runtime, build_mesh
from moe_dist.train import build_model

SEQ_LEN = 16
TOKENS = torch.randint(0, 96, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))


def upcycle(experts: int, top_k: int, expert_hidden: int, **more) -> dict[str, object]:
    return {"data.seq_len": SEQ_LEN, "moe.num_experts": experts, "moe.top_k": top_k,
            "moe.expert_hidden": expert_hidden, **more}


# family -> the MoE it is upcycled into (each dense MLP is 48 wide): whole copies (g = 1) and segments (g = 2, 4).
CASES = {"llama": upcycle(4, 2, 48), "qwen3": upcycle(4, 2, 24), "qwen2": upcycle(8, 4, 12),
         "mistral": upcycle(4, 2, 24, **{"moe.first_k_dense": 1})}


def logits(model: torch.nn.Module, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return out[0] if isinstance(out, tuple) else out.logits


@pytest.mark.parametrize("family", CASES)
def test_upcycled_logits_equal_the_dense_models(tmp_path, family):
    hf = save_tiny(family, tmp_path)
    dense, cfg = import_model(tmp_path, {"data.seq_len": SEQ_LEN})
    assert cfg.moe.num_experts == 0 and relative_error(logits(dense), logits(hf)) <= 1e-5
    model, cfg = import_model(tmp_path, CASES[family])
    assert len(moe_layers(model)) == 2 - cfg.moe.first_k_dense
    assert relative_error(logits(model), logits(hf)) <= 1e-5


def test_each_segment_counts_once_and_noise_moves_the_output(tmp_path):
    """A copy's 2 segments score alike (tied router rows), copies differ; the identity fails without the x g on w2,
    or with noise."""
    hf = save_tiny("qwen3", tmp_path)
    model, cfg = import_model(tmp_path, CASES["qwen3"])
    rows = moe_layers(model)[0].router.gate.weight
    assert torch.equal(rows[0], rows[1]) and torch.equal(rows[2], rows[3]) and not torch.equal(rows[0], rows[2])
    with torch.no_grad():
        for moe in moe_layers(model):
            moe.experts.w2 /= 2
    assert relative_error(logits(model), logits(hf)) > 1e-3
    noisy, _ = import_model(tmp_path, {**CASES["qwen3"], "train.upcycle_noise": 0.1})
    assert relative_error(logits(noisy), logits(hf)) > 1e-3


def test_noise_has_its_size_and_training_tells_the_copies_apart(tmp_path):
    save_tiny("llama", tmp_path)
    model, cfg = import_model(tmp_path, {**CASES["llama"], "optim.lr": 1e-2})
    dense_w1 = load_file(tmp_path / "model.safetensors")["model.layers.1.mlp.gate_proj.weight"].T
    assert all(torch.equal(expert, dense_w1) for expert in moe_layers(model)[1].experts.w1)
    train_steps(model, cfg, torch.randint(0, 96, (1, 1, 4, SEQ_LEN + 1), generator=torch.Generator().manual_seed(2)))
    for moe in moe_layers(model):
        w1 = moe.experts.w1
        assert all(not torch.equal(w1[a], w1[b]) for a in range(4) for b in range(a))

    noisy, _ = import_model(tmp_path, {**CASES["llama"], "train.upcycle_noise": 0.05})
    w1 = moe_layers(noisy)[-1].experts.w1
    rms = dense_w1.square().mean().sqrt()
    assert all(((w1[e] - dense_w1).std() / rms).item() == pytest.approx(0.05, rel=0.1) for e in range(4))
    assert all(not torch.equal(w1[a], w1[b]) for a in range(4) for b in range(a))


def upcycle_worker(rank, world_size, cases, tokens):
    """Per case: the logits of the whole (same) batch on every rank, and the full upcycled weights."""
    results = []
    for cfg in cases:
        runtime = Runtime(rank, world_size, rank, torch.device("cpu"))
        model = build_model(cfg, build_mesh(cfg, world_size, "cpu"), runtime, open_init_weights(cfg).read)
        results.append((logits(model, tokens), full_parameters(model)))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_upcycling_equals_single_process(tmp_path, world_size):
    """ep 2 (x dp_shard 2 at world 4): the same upcycled weights, bit for bit, and the dense model's logits."""
    cases = {"llama": CASES["llama"], "qwen3": CASES["qwen3"],
             "mistral": {**CASES["mistral"], "train.upcycle_noise": 0.05}}
    dense = {family: save_tiny(family, tmp_path / family) for family in cases}
    configs = [config_from_hf(tmp_path / family, {**overrides, "parallel.ep": 2,
                                                  "train.init_from": str(tmp_path / family)})
               for family, overrides in cases.items()]
    per_rank = run_on_ranks(upcycle_worker, world_size, configs, TOKENS)
    for c, (family, overrides) in enumerate(cases.items()):
        want = full_parameters(import_model(tmp_path / family, overrides)[0])
        for rank, results in enumerate(per_rank):
            got_logits, got = results[c]
            assert got.keys() == want.keys()
            assert all(torch.equal(got[name], want[name]) for name in want), (family, rank)
            if "train.upcycle_noise" not in overrides:
                assert relative_error(got_logits, logits(dense[family])) <= 1e-5, (family, rank)


def test_a_dense_moe_dist_export_upcycles_the_same_way(tmp_path):
    dense_cfg = load_config(None, {"model.vocab_size": 96, "model.dim": 32, "model.n_layers": 2, "model.n_heads": 4,
                                   "model.n_kv_heads": 2, "model.ffn_hidden": 48, "model.max_seq_len": 64,
                                   "moe.num_experts": 0, "data.seq_len": SEQ_LEN})
    dense = Transformer(dense_cfg.model, dense_cfg.moe, seed=3)
    export.write_export(dense, dense_cfg, None, tmp_path, None, "float32")
    for overrides, experts in (({}, 0), (upcycle(4, 2, 24), 4)):
        cfg = with_init_from("tiny", {"train.init_from": str(tmp_path), "data.seq_len": SEQ_LEN, **overrides})
        assert cfg.model == dense_cfg.model and cfg.moe.num_experts == experts
        model = meta_model(cfg)
        materialize(model, torch.device("cpu"), open_init_weights(cfg).read)
        assert len(moe_layers(model)) == (1 if experts else 0)  # tiny.toml's first_k_dense = 1
        assert relative_error(logits(model), logits(dense)) <= 1e-5


def test_the_planner_reads_a_dense_config_as_dense_or_upcycled(tmp_path, capsys):
    """Dense: transformers' parameter count. Upcycled (4 whole copies, top-2, both layers): the dense MLPs become
    4 experts each, 2 of them active, plus a router."""
    hf = save_tiny("llama", tmp_path)
    total = sum(p.numel() for p in hf.parameters())
    mlp = 3 * 32 * 48
    for overrides, want in (({"data.seq_len": SEQ_LEN}, (total, total)),
                            (CASES["llama"], (total + 2 * (3 * mlp + 4 * 32), total + 2 * (mlp + 4 * 32)))):
        assert params.main(["--config", str(tmp_path), *[f"--{k}={v}" for k, v in overrides.items()]]) == 0
        assert ["total", *(f"{n:,}" for n in want)] in [line.split() for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("change, message", [
    ({"moe.expert_hidden": 20}, "moe.expert_hidden = 20 must divide model.ffn_hidden = 48"),
    ({"moe.expert_hidden": 96}, "moe.expert_hidden = 96 must divide model.ffn_hidden = 48"),
    ({"moe.top_k": 1}, "moe.top_k = 1 must be a multiple of the 2 segments"),
    ({"moe.num_experts": 3, "moe.top_k": 2}, "moe.num_experts = 3 must be a multiple of the 2 segments"),
    ({"moe.shared_expert_hidden": 16}, "moe.shared_expert_hidden = 16: upcycling"),
    ({"moe.num_experts": 0, "train.upcycle_noise": 0.1}, "train.upcycle_noise = 0.1 applies only to upcycling"),
])
def test_what_cannot_be_upcycled_is_one_line_naming_the_key(tmp_path, capsys, change, message):
    save_tiny("llama", tmp_path / "llama")
    args = {**upcycle(4, 2, 24), **change}
    capsys.readouterr()
    assert train.main(["--train.init_from", str(tmp_path / "llama"), "--metrics.runs_dir", str(tmp_path / "runs"),
                       *[f"--{k}={v}" for k, v in args.items()], "--preflight"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_mlp_bias_is_refused_naming_the_key(tmp_path):
    save_tiny("llama", tmp_path, mlp_bias=True)
    with pytest.raises(ConfigError, match="mlp_bias = true is not supported"):
        config_from_hf(tmp_path)


def test_the_trainer_checks_an_upcycling_start(tmp_path):
    """The start-up path with --train.init_from a dense dir and moe.* on the command line: preflight passes."""
    source = tmp_path / "llama"
    save_tiny("llama", source, vocab_size=320)
    train_tokenizer(["The quick brown fox jumps over the lazy dog."], 300).save(str(source / "tokenizer.json"))
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"{i}: the quick brown fox jumps over the lazy dog. " * 2}) + "\n"
                            for i in range(200)))
    assert prep.main(["--input", str(docs), "--out", str(tmp_path / "data"), "--vocab-size", "320",
                      "--tokenizer", str(source)]) == 0
    assert train.main(["--train.init_from", str(source), "--metrics.runs_dir", str(tmp_path / "runs"),
                       "--data.path", str(tmp_path / "data"), "--data.micro_batch", "2",
                       *[f"--{k}={v}" for k, v in upcycle(4, 2, 24).items()], "--preflight"]) == 0
