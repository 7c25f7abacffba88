"""launch/: local.sh end to end on CPU; the SLURM script's torchrun command line."""

import os
import shlex
import signal
import subprocess
import sys

import pytest

from moe_dist.checkpoint import latest_checkpoint, verify
from runs import REPO, SMALL_MODEL, read_metrics, train_losses, trainer_args, wait_for


def local_sh(*args: str) -> subprocess.Popen:
    """launch/local.sh with two CPU processes and this interpreter."""
    env = {**os.environ, "NPROC": "2", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(["launch/local.sh", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_local_sh_trains_on_two_ranks_and_sigterm_saves_and_exits_0(tmp_path, prepared_data):
    # Async saves every two steps while training goes on: the background save has a process group of its own.
    args = trainer_args(tmp_path, prepared_data, *SMALL_MODEL, "--train.steps", "100000", "--metrics.log_interval",
                        "2", "--train.eval_interval", "4", "--parallel.ep", "0", "--optim.lr", "1e-2",
                        "--checkpoint.interval", "2", "--checkpoint.async_save", "true")
    launcher = local_sh(*args)
    wait_for(lambda: max(train_losses(tmp_path / "tiny"), default=0) >= 8, launcher)
    launcher.send_signal(signal.SIGTERM)  # to the launcher: the ranks save and exit 0, and so does it
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err[-3000:]
    assert "2 ranks = dp_shard 1 x ep 2 on cpu" in out and "SIGTERM: saved" in out
    latest = latest_checkpoint(tmp_path / "tiny" / "checkpoints")
    verify(latest)
    records = read_metrics(tmp_path / "tiny")
    train = [r for r in records if r["kind"] == "train"]
    assert train[-1]["step"] == int(latest.name.split("-")[1]) >= 8 and train[-1]["loss"] < train[0]["loss"]
    assert [r["step"] for r in records if r["kind"] == "eval"][:2] == [4, 8]


@pytest.mark.slow
def test_local_sh_with_a_mesh_that_does_not_fit(tmp_path, prepared_data):
    args = trainer_args(tmp_path / "runs", prepared_data, "--parallel.ep", "1", "--parallel.dp_shard", "4")
    out, err = local_sh(*args).communicate(timeout=300)
    # Checked once before torchrun starts: our line alone, and the exit code of a plain process.
    assert err == "config: parallel.dp_shard = 4 x parallel.ep = 1 must equal the world size 2 (nodes x " \
                  "--nproc_per_node)\n"
    assert not (tmp_path / "runs").exists()


def slurm_commands(tmp_path, *args: str, **env: str) -> tuple[list[str], list[str]]:
    """The commands slurm.sbatch would run (the check, then srun), printed by DRY_RUN=1 with SLURM's variables and
    a stand-in scontrol."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[01-04]" ] && printf "gpu01\\ngpu02\\n"\n')
    scontrol.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "DRY_RUN": "1", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "4",
           "SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_SUBMIT_DIR": str(tmp_path), **env}
    result = subprocess.run(["bash", "launch/slurm.sbatch", *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    check, srun = result.stdout.strip().splitlines()
    return shlex.split(check), shlex.split(srun)


def test_slurm_script_parses():
    assert subprocess.run(["bash", "-n", "launch/slurm.sbatch"], cwd=REPO).returncode == 0


def test_slurm_torchrun_command(tmp_path):
    check, cmd = slurm_commands(tmp_path, "--config", "3b", "--train.name", "a b")
    assert check == ["env", "WORLD_SIZE=32", "python3", "-m", "moe_dist.train", "--preflight", "--checkpoint.resume",
                     "auto", "--config", "3b", "--train.name", "a b"]
    assert cmd == ["srun", "--kill-on-bad-exit=1", "python3", "-m", "torch.distributed.run",
                   "--nnodes=4", "--nproc_per_node=8", "--rdzv_id=4242", "--rdzv_backend=c10d",
                   "--rdzv_endpoint=gpu01:29500", "--max-restarts=3", f"--log-dir={tmp_path}/logs/4242", "--tee=3",
                   "-m", "moe_dist.train", "--checkpoint.resume", "auto", "--config", "3b", "--train.name", "a b"]


def test_slurm_variables(tmp_path):
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    venv_python = tmp_path / ".venv" / "bin" / "python"
    venv_python.write_text("#!/bin/sh\n")
    venv_python.chmod(0o755)
    cmd = slurm_commands(tmp_path, GPUS_PER_NODE="4", MASTER_PORT="30000", MAX_RESTARTS="0", LOG_DIR="/scratch/l")[1]
    assert cmd[2] == str(venv_python)  # the submit dir's .venv when there is one
    assert {"--nproc_per_node=4", "--rdzv_endpoint=gpu01:30000", "--max-restarts=0", "--log-dir=/scratch/l"} \
        <= set(cmd)
    # What sbatch --gpus-per-node=2 sets:
    assert "--nproc_per_node=2" in slurm_commands(tmp_path, SLURM_GPUS_ON_NODE="2")[1]


def test_slurm_outside_slurm_is_one_line(tmp_path):
    result = subprocess.run(["bash", "launch/slurm.sbatch"], cwd=REPO, capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"]})
    assert result.returncode != 0 and "submit with sbatch" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
