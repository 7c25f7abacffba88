"""The memory planner against what real runs allocate, and its command line."""

import pytest
import torch

from distributed import run_on_ranks
from equivalence import MICRO_BATCH, global_batches, small_config, split
from moe_dist.memory import FP32, activation_bytes, local_shard_numels, parse_bytes, plan_memory
from moe_dist.model import Transformer, hidden_matrices
from moe_dist.optim import build_optimizer, build_scheduler
from moe_dist.parallel import local_part
from moe_dist.parallel.mesh import Runtime, build_mesh
from moe_dist.params import main
from moe_dist.train import build_model, loss_fn, train_step


def _local_bytes(tensor: torch.Tensor) -> int:
    local = local_part(tensor)
    return local.numel() * local.element_size()


def allocated_worker(rank, world_size, cfg, batches):
    """What this rank really holds after a step: bytes of each parameter shard, of the gradients, of AdamW."""
    model = build_model(cfg, build_mesh(cfg, world_size, "cpu"),
                        Runtime(rank, world_size, rank, torch.device("cpu")))
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    inputs, targets = split(batches[0, 0, rank * MICRO_BATCH:(rank + 1) * MICRO_BATCH])
    train_step(model, optimizer, scheduler, [(inputs, targets)], cfg.optim.grad_clip)  # creates the AdamW states
    logits, aux_loss = model(inputs)
    (loss_fn(logits, targets) + aux_loss).backward()  # the gradients, which train_step frees after its update
    params = {name: _local_bytes(p) for name, p in model.named_parameters()}
    grads = sum(_local_bytes(p.grad) for p in model.parameters())
    states = sum(_local_bytes(t) for state in optimizer.state.values() for t in state.values())
    return params, grads, states


@pytest.mark.slow
@pytest.mark.parametrize("world_size,ep,biases,optimizer", [(2, 1, False, "adamw"), (4, 1, False, "muon"),
                                                            (4, 2, False, "adamw"), (4, 2, True, "muon")])
def test_planner_matches_allocated_shards(world_size, ep, biases, optimizer):
    # Sizes that torch.chunk cuts unevenly: vocab 251; 6 experts over 4 ranks and 3 local experts over 2
    # dp_shard ranks, which FSDP cuts on their last dim (the biases' too).
    cfg = small_config(**{"model.vocab_size": "251", "moe.num_experts": "6", "parallel.ep": str(ep),
                          "moe.expert_biases": str(biases), "moe.router_bias": str(biases), "optim.name": optimizer})
    results = run_on_ranks(allocated_worker, world_size, cfg, global_batches(cfg, 1, world_size))
    model = Transformer(cfg.model, cfg.moe)
    matrices = {id(p) for p in hidden_matrices(model)} if optimizer == "muon" else set()
    muon = {name for name, p in model.named_parameters() if id(p) in matrices}
    for rank, (params, grads, states) in enumerate(results):
        expected = {name: FP32 * n for name, n in local_shard_numels(cfg, world_size, rank).items()}
        assert params == expected, rank
        assert grads == sum(expected.values())
        # Muon: a momentum per hidden matrix; AdamW: exp_avg, exp_avg_sq, step
        assert states == sum(n if name in muon else 2 * n + FP32 for name, n in expected.items())
    assert len({sum(p.values()) for p, _, _ in results}) > 1  # the uneven cut is exercised
    plan = plan_memory(cfg, world_size, "cpu")
    params, grads, states = results[0]  # rank 0 holds the largest shards
    assert (plan.params, plan.grads, plan.optimizer) == (sum(params.values()), grads, states)


MLA = {"model.attention": "mla", "model.q_lora_rank": "48", "model.kv_lora_rank": "32", "model.qk_nope_head_dim": "16",
       "model.qk_rope_head_dim": "8", "model.v_head_dim": "24"}


@pytest.mark.parametrize("overrides", [
    {}, {"moe.shared_expert_hidden": "64", "moe.top_k": "1"}, {"moe.num_experts": "0"}, MLA,
    {**MLA, "model.q_lora_rank": "0"}, {"model.qk_norm": "head", "model.head_dim": "32"}, {"model.qk_norm": "full"},
    {"model.qkv_bias": "true", "model.out_bias": "true", "moe.router_bias": "true", "moe.expert_biases": "true",
     "moe.expert_act": "clamped_swiglu"},
])
def test_activation_estimate_matches_saved_tensors(overrides):
    """Within 10% of the bytes autograd saves in a real forward (plus the logits and their gradient).

    On the grouped_mm backend, as on GPUs: the CPU's padded one for small groups keeps padded copies. Not sinks
    or a sliding window: on CPU they take a dense-mask kernel, on CUDA flex_attention, whose savings the estimate
    follows.
    """
    cfg = small_config(**{"data.micro_batch": "4", "model.vocab_size": "1024", "moe.grouped_mm_backend": "grouped_mm",
                          **overrides})
    model = Transformer(cfg.model, cfg.moe)
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.data.micro_batch, cfg.data.seq_len + 1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, aux_loss = model(tokens[:, :-1])
        loss_fn(logits, tokens[:, 1:]) + aux_loss
    measured = sum(saved.values()) + 2 * logits.numel() * logits.element_size()
    blocks, _, head = activation_bytes(cfg, FP32)
    assert abs(blocks + head - measured) <= 0.10 * measured, (blocks + head, measured)


def test_checkpointing_keeps_block_inputs_and_one_block():
    cfg = small_config()
    blocks, checkpointed, _ = activation_bytes(cfg, 2)
    block_input = cfg.data.micro_batch * cfg.data.seq_len * cfg.model.dim * 2
    assert blocks / cfg.model.n_layers < checkpointed - cfg.model.n_layers * block_input <= blocks


def test_parse_bytes():
    assert parse_bytes("80GiB") == parse_bytes("80G") == 80 * 2**30
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("512 MiB") == 2**29 and parse_bytes("1000") == 1000
    with pytest.raises(ValueError, match="not a size: 'lots'"):
        parse_bytes("lots")


def test_3b_recipe_fits_eight_80gb_gpus(capsys):
    assert main(["--config", "3b", "--world", "8", "--ep", "8", "--device-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "8 ranks = dp_shard 1 x ep 8" in out and "does NOT fit" not in out
    assert out.count("| fits in 80.00 GiB") == 2
    assert main(["--config", "3b", "--world", "8", "--device-memory", "8GiB"]) == 0
    assert capsys.readouterr().out.count("does NOT fit in 8.00 GiB") == 2


@pytest.mark.parametrize("args,message", [
    (["--world", "8", "--ep", "3"], "config: parallel.ep = 3 must divide moe.num_experts = 16"),
    (["--world", "6", "--ep", "4"], "config: parallel.ep = 4 must divide the world size 6"),
    (["--world", "zero"], "params: --world 'zero' must be a positive integer"),
    (["--device-memory", "lots"], "params: --device-memory 'lots' is not a size"),
])
def test_planner_bad_input_is_one_line(capsys, args, message):
    assert main(["--config", "3b", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
