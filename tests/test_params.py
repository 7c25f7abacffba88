"""Parameter counter against the real model built on the meta device."""

import pytest

from moe_dist.config import load_config
from moe_dist.params import count_params, main, meta_model_numel


@pytest.mark.parametrize("name", ["tiny", "small", "3b"])
def test_counter_matches_meta_model(name):
    cfg = load_config(name)
    assert count_params(cfg)["total"][0] == meta_model_numel(cfg)


def test_3b_is_about_three_billion(capsys):
    total, active = count_params(load_config("3b"))["total"]
    assert 2.7e9 <= total <= 3.3e9
    assert active < total
    assert main(["--config", "3b"]) == 0
    assert "matches" in capsys.readouterr().out
