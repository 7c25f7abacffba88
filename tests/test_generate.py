"""Sampling: the KV cache changes nothing, filters and seeds behave, the CLI reads checkpoints and exports."""

from __future__ import annotations

import pytest
import torch
from test_export import TINY, make_run

from moe_dist import export, generate
from moe_dist.config import load_config
from moe_dist.generate import sample_next
from moe_dist.model import Transformer
from moe_dist.model.transformer import KVCache


def tiny_model(**overrides: str) -> Transformer:
    cfg = load_config("tiny", {**TINY, **overrides})
    return Transformer(cfg.model, cfg.moe).eval()


@pytest.mark.parametrize("overrides", [{}, {"moe.first_k_dense": "1", "moe.shared_expert_hidden": "32",
                                             "model.n_kv_heads": "4"}])
def test_cached_forward_matches_full_forward(overrides):
    model = tiny_model(**overrides)
    tokens = torch.randint(0, 320, (2, 30))
    cache = KVCache.empty(model.cfg, batch_size=2)
    with torch.no_grad():
        full, _ = model(tokens)
        # A prompt, single tokens, then a block of several new tokens against the cached ones.
        chunks = [model(tokens[:, :12], cache, 0)[0]]
        chunks += [model(tokens[:, i:i + 1], cache, i)[0] for i in range(12, 20)]
        chunks.append(model(tokens[:, 20:], cache, 20)[0])
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)


def test_greedy_is_the_same_with_and_without_cache():
    model = tiny_model()
    prompt = torch.randint(0, 320, (2, 5))
    cached = generate.generate(model, prompt, 40)
    uncached = generate.generate(model, prompt, 40, use_cache=False)
    assert cached.shape == (2, 45)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :5], prompt)


def test_top_k_1_is_greedy_and_seeded_sampling_is_reproducible():
    model = tiny_model()
    prompt = torch.randint(0, 320, (1, 4))
    greedy = generate.generate(model, prompt, 20)
    top1 = generate.generate(model, prompt, 20, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(top1, greedy)

    def sample(seed: int, use_cache: bool = True) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return generate.generate(model, prompt, 20, temperature=1.0, top_p=0.9, generator=generator,
                                 use_cache=use_cache)

    assert torch.equal(sample(1), sample(1))
    assert torch.equal(sample(1), sample(1, use_cache=False))
    assert not torch.equal(sample(1), sample(2))


def test_top_k_and_top_p_keep_only_the_most_likely_tokens():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]]).log_softmax(-1).expand(2000, 5)
    generator = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=generator).unique().tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # 0.56, 0.21, 0.13, 0.03, 0.08: the first three are the smallest set past 0.85
    assert probs[:2].sum() < 0.85 < probs[:3].sum()
    assert set(sample_next(logits, 1.0, top_p=0.85, generator=generator).unique().tolist()) == {0, 1, 2}
    assert sample_next(logits, 1.0, top_p=0.01, generator=generator).unique().tolist() == [0]
    assert sample_next(logits, 0.0).unique().tolist() == [0]


def test_generation_stops_at_max_seq_len_and_stop_token():
    model = tiny_model()
    out = generate.generate(model, torch.randint(0, 320, (1, 60)), 10)
    assert out.shape == (1, 64)  # model.max_seq_len
    with pytest.raises(ValueError, match="max_seq_len"):
        generate.generate(model, torch.randint(0, 320, (1, 65)), 1)
    greedy = generate.generate(model, torch.randint(0, 320, (1, 3)), 10)
    stop_id = greedy[0, 5].item()
    first = greedy[0, 3:].tolist().index(stop_id) + 3
    assert torch.equal(generate.generate(model, greedy[:, :3], 10, stop_id=stop_id), greedy[:, :first + 1])


def test_cli_from_checkpoint_and_export_with_and_without_cache(tmp_path, capsys):
    run, _ = make_run(tmp_path / "run")
    assert export.main([str(run), "--out", str(tmp_path / "export")]) == 0
    capsys.readouterr()
    texts = []
    for path in (run, run / "checkpoints" / "step-3", tmp_path / "export"):
        for flags in ([], ["--no-kv-cache"]):
            argv = ["--checkpoint", str(path), "--prompt", "The quick", "--max-new-tokens", "12",
                    "--temperature", "0", *flags]
            assert generate.main(argv) == 0
            out, err = capsys.readouterr()
            assert out.startswith("The quick") and "tokens/s" in err
            texts.append(out)
    assert len(set(texts)) == 1

    sampled = []
    for _ in range(2):
        assert generate.main(["--checkpoint", str(run), "--prompt", "fox", "--seed", "7", "--top-k", "50",
                              "--top-p", "0.9"]) == 0
        sampled.append(capsys.readouterr().out)
    assert sampled[0] == sampled[1]


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    run, _ = make_run(tmp_path / "run")
    assert generate.main(["--checkpoint", str(run), "--prompt", "dog " * 100]) == 2
    assert "max_seq_len" in capsys.readouterr().err
    (run / "tokenizer.json").unlink()
    assert generate.main(["--checkpoint", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer.json" in err
    assert generate.main(["--checkpoint", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
