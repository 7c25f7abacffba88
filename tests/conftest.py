import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)  # pytest-xdist runs one worker per core


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory):
    """A small prepared corpus (vocab 512) from a slice of the standard library, shared by the run tests."""
    from moe_dist.data.corpus import stdlib_dir, stdlib_texts
    from moe_dist.data.prep import prepare

    root = tmp_path_factory.mktemp("corpus")
    (root / "in").mkdir()
    for i, text in enumerate(stdlib_texts(stdlib_dir(), 600_000)):
        (root / "in" / f"{i:04d}.txt").write_text(text)
    return prepare([root / "in"], root / "out", 512, workers=1, val_fraction=0.2)
