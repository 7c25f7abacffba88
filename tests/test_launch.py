"""launch/: local.sh end to end on CPU; the SLURM script's torchrun command line."""

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_dist.checkpoint import latest_checkpoint, verify
from runs import REPO, SMALL_MODEL, local_sh, processes_with, read_metrics, train_losses, trainer_args, wait_for


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
def test_ranks_end_within_seconds_of_a_kill_9_of_the_launcher(tmp_path, prepared_data):
    # The launcher alone is killed (not its process group): torchrun must end with it, and the ranks, which
    # torchrun starts in sessions of their own, with torchrun. A checkpoint every step, so one is being written.
    runs_dir = tmp_path / "owned"
    args = trainer_args(runs_dir, prepared_data, *SMALL_MODEL, "--train.steps", "100000", "--checkpoint.interval",
                        "1", "--train.eval_interval", "0")
    launcher = local_sh(*args, start_new_session=True)
    wait_for(lambda: len(train_losses(runs_dir / "tiny")) >= 3, launcher)
    ours = set(processes_with(str(runs_dir)))
    assert len(ours) == 4, ours  # the launcher, torchrun and two ranks
    launcher.kill()
    launcher.communicate()
    deadline = time.time() + 10
    while set(processes_with(str(runs_dir))) & ours and time.time() < deadline:
        time.sleep(0.1)
    assert not set(processes_with(str(runs_dir))) & ours, "a process outlived the launcher by 10 s"
    latest = latest_checkpoint(runs_dir / "tiny" / "checkpoints")
    verify(latest)
    assert int(latest.name.split("-")[1]) >= 1


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


SRUN = """#!/bin/sh
# srun stand-in: each node's copy of the command, all on this machine.
while [ "${1#--}" != "$1" ]; do shift; done
pids=""
node=0
while [ $node -lt "$SLURM_NNODES" ]; do
    SLURM_NODEID=$node "$@" &
    pids="$pids $!"
    node=$((node + 1))
done
code=0
for pid in $pids; do wait "$pid" || code=$?; done
exit $code
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_pid(runs_dir, rank: int) -> int:
    """The trainer rank `rank` of the run writing to runs_dir (not its agents, not the preflight)."""
    for pid in processes_with(str(runs_dir)):
        try:
            cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
            environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"moe_dist.train" in cmdline and b"--preflight" not in cmdline and f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no rank {rank} writing to {runs_dir}")


@pytest.mark.slow
def test_two_nodes_as_slurm_starts_them_train_and_resume_after_a_rank_dies(tmp_path, prepared_data):
    # launch/slurm.sbatch itself, with stand-ins for srun and scontrol: two torchrun agents (one rank each) meet
    # over the c10d rendezvous, ep 2 spans the two "nodes"; rank 1 is killed mid-run and both agents restart.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", "#!/bin/sh\necho localhost\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_SUBMIT_DIR": str(REPO), "PYTHON": sys.executable,
           "GPUS_PER_NODE": "1", "MASTER_PORT": str(free_port()), "MAX_RESTARTS": "1",
           "LOG_DIR": str(tmp_path / "logs"), "OMP_NUM_THREADS": "1"}
    runs_dir = tmp_path / "runs"
    args = trainer_args(runs_dir, prepared_data, *SMALL_MODEL, "--train.steps", "12", "--checkpoint.interval", "4",
                        "--parallel.ep", "2", "--train.eval_interval", "0")
    job = subprocess.Popen(["bash", "launch/slurm.sbatch", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    run_dir = runs_dir / "tiny"
    try:
        wait_for(lambda: max(train_losses(run_dir), default=0) >= 6, job)
        os.kill(rank_pid(runs_dir, 1), signal.SIGKILL)
        out, err = job.communicate(timeout=600)
    finally:
        os.killpg(job.pid, signal.SIGKILL) if job.poll() is None else None
    assert job.returncode == 0, err[-3000:]
    assert "2 ranks = dp_shard 1 x ep 2 on cpu" in out
    resumed = [line for line in out.splitlines() if "resuming from" in line]
    assert len(resumed) == 1 and "step-4" in resumed[0], out[-3000:]  # the restart resumed; the first start did not
    assert sorted(train_losses(run_dir)) == list(range(1, 13))
    latest = latest_checkpoint(run_dir / "checkpoints")
    assert latest.name == "step-12"
    verify(latest)


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
