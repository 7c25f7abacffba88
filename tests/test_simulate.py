"""Beyond one machine, simulated: the 3b config's ranks at world 64 (ep 8 x dp_shard 8) hold what the planner says."""

from __future__ import annotations

import contextlib
import io

from distributed import in_fresh_process
from moe_dist import params
from moe_dist.config import load_config
from moe_dist.simulate import planned_rank, simulate_rank, simulated_ranks


# Each in a fresh process: the fake process group is global to the process that creates it.

def simulate_and_plan(world: int, ep: int, ranks: list[int]) -> list:
    cfg = load_config("3b", {"parallel.ep": str(ep)})
    return [(simulate_rank(cfg, world, rank), planned_rank(cfg, world, rank)) for rank in ranks]


def params_main(argv: list[str]) -> tuple[int, str, str]:
    """python -m moe_dist.params's main, without the interpreter's start: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = params.main(argv)
    return code, out.getvalue(), err.getvalue()


def test_3b_at_world_64_holds_the_planned_shards():
    pairs = in_fresh_process(simulate_and_plan, 64, 8, simulated_ranks(64))
    assert [got.rank for got, _ in pairs] == [0, 1, 32, 63]
    for got, want in pairs:
        assert got.shapes == want.shapes, got.rank
        assert (got.params, got.grads, got.optimizer) == (want.params, want.grads, want.optimizer), got.rank
        # 2 experts per EP rank over 8 dp_shard ranks are cut on dim 2: every rank holds a slice of both
        expert = got.shapes["layers.1.ffn.experts.w1"]
        assert expert == (2, 2048, 1792 // 8), expert
    sizes = [got.params for got, _ in pairs]
    assert max(sizes) / min(sizes) < 1.01  # balanced (cut on dim 0, rank 0 held 30x rank 63)


def test_simulate_option_reports_each_rank():
    code, out, err = in_fresh_process(params_main, ["--config", "tiny", "--world", "16", "--ep", "8", "--simulate"])
    assert code == 0, err
    assert out.count("as planned") == 4, out
