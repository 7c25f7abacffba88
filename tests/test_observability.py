"""What a run reports: per-layer expert load in metrics.jsonl, TensorBoard scalars, and the plots."""

import importlib.util

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moe_dist.config import ConfigError, load_config
from moe_dist.metrics import MetricsLogger, drop_torn_tail
from moe_dist.plot import main as plot_main
from runs import read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_expert_load_per_layer(finished_run):
    run_dir, _ = finished_run
    cfg = load_config(str(run_dir / "config.toml"))
    train = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    routed = cfg.data.micro_batch * cfg.data.seq_len * cfg.moe.top_k  # one rank, one micro-batch
    for record in train:
        assert sorted(record["expert_load"]) == ["0", "1"]  # block indices of the MoE layers
        for layer, counts in record["expert_load"].items():
            assert len(counts) == cfg.moe.num_experts and sum(counts) == routed
            assert record["expert_load_max_mean"][layer] == pytest.approx(max(counts) / (routed / len(counts)))
            capacity = -(-cfg.moe.capacity_factor * cfg.data.seq_len * cfg.moe.top_k // cfg.moe.num_experts)
            assert 0 < record["dropped"][layer] <= routed - capacity  # capacity 1.0 drops some pairs


def test_tensorboard_scalars(finished_run):
    run_dir, _ = finished_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "eval/val_loss", "moe/expert_load_max_mean/layer0", "moe/dropped/layer1"} \
        <= set(scalars)
    losses = {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}
    assert {e.step: pytest.approx(e.value) for e in events.Scalars("train/loss")} == losses


def test_tensorboard_missing_is_one_line(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard"
                        else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"^config: metrics.tensorboard = true needs the tensorboard package"):
        load_config("tiny", {"metrics.tensorboard": "true"})


def test_plot_writes_pngs(finished_run, tmp_path, capsys):
    run_dir, _ = finished_run
    assert plot_main([str(run_dir), "--out", str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["expert_load_layer0.png", "expert_load_layer1.png", "loss.png"]
    for name in written:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, name
    assert capsys.readouterr().out.split() == [str(tmp_path / n) for n in ["loss.png", "expert_load_layer0.png",
                                                                          "expert_load_layer1.png"]]


def test_plot_errors_are_one_line(tmp_path, capsys):
    assert plot_main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"plot: {tmp_path}/metrics.jsonl: no such file " \
                                              f"(is {tmp_path} a run directory?)"
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n{broken\n')
    assert plot_main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"plot: {tmp_path}/metrics.jsonl:2: not valid JSON")
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 2.0}\n{"kind": "tra')
    assert plot_main([str(tmp_path)]) == 0  # a live run's line in the middle of being written is left out


def test_a_torn_last_line_is_cut_when_a_run_restarts(tmp_path):
    path = tmp_path / "metrics.jsonl"
    whole = '{"kind": "train", "step": 1}\n{"kind": "train", "step": 2}\n'
    path.write_text(whole + '{"kind": "tr')  # a run killed while writing
    MetricsLogger(tmp_path, 0, 10, 2, 1, 1).close()
    assert path.read_text() == whole
    for block in (4, 1 << 16):  # reading back in blocks shorter and longer than a line
        path.write_text(whole + '{"kind": "tr')
        drop_torn_tail(path, block)
        assert path.read_text() == whole
    path.write_text('{"kind": "tr')
    drop_torn_tail(path)
    assert path.read_text() == ""
