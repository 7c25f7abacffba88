"""torch.compile captures the transformer blocks, under activation checkpointing as without it."""

import functools
from collections.abc import Callable

import pytest
import torch
import torch._dynamo

from equivalence import global_batches, small_config, split
from moe_dist.model import Transformer
from moe_dist.parallel.fsdp import apply_compile_and_checkpointing
from moe_dist.train import loss_fn


@pytest.fixture
def fresh_dynamo():
    """Every graph captured anew, and none left behind for other tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def captured_ops(checkpoint: bool, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The ops in each graph dynamo captures over one forward and backward of a dense block and an MoE block."""
    graphs = []

    def count(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        graphs.append(sum(node.op.startswith("call") for node in gm.graph.nodes))
        return gm.forward  # run as captured: counting needs no inductor

    torch._dynamo.reset()
    cfg = small_config(**{"model.n_layers": "2"})
    model = Transformer(cfg.model, cfg.moe)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "compile", functools.partial(torch.compile, backend=count))
        apply_compile_and_checkpointing(model, compile=True, checkpoint=checkpoint)
    inputs, targets = split(global_batches(cfg, 1, 1)[0, 0])
    logits, aux_loss = model(inputs)
    (loss_fn(logits, targets) + aux_loss).backward()
    return graphs


def test_checkpointed_blocks_are_compiled(monkeypatch, fresh_dynamo):
    # Compiled around the checkpoint, the blocks ran eagerly: 1 graph of 3 ops against 5 graphs of 145 without it.
    plain = captured_ops(False, monkeypatch)
    assert len(plain) > 2 and captured_ops(True, monkeypatch) == plain
