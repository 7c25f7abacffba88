import shutil

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


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, prepared_data):
    """(run dir, its argv): 4 steps of a small model in this process, checkpointed at steps 2 and 4,
    both layers MoE, dropping tokens (capacity 1.0), with TensorBoard on. Copy it before changing it."""
    from moe_dist.train import main
    from runs import SMALL_MODEL, trainer_args

    root = tmp_path_factory.mktemp("finished")
    argv = trainer_args(root, prepared_data, *SMALL_MODEL, "--train.name", "run", "--train.steps", "4",
                        "--checkpoint.interval", "2", "--moe.capacity_factor", "1.0", "--moe.first_k_dense", "0",
                        "--metrics.tensorboard", "true")
    assert main(argv) == 0
    return root / "run", argv


@pytest.fixture
def run_copy(tmp_path, finished_run):
    """A copy of the finished run (runs dir, run dir) and the argv that made it, pointed at the copy."""
    run_dir, argv = finished_run
    runs = tmp_path / "runs"
    shutil.copytree(run_dir.parent, runs, symlinks=True)
    argv = [str(runs) if a == str(run_dir.parent) else a for a in argv]
    return runs, runs / run_dir.name, argv
