"""The GPU path's decisions and plumbing, on CPU: backend rule by compute capability, datasheet peaks, gpu-check's
and `make install`'s checks for a torch that cannot use a visible GPU, process-group start and exit, `make bench`."""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import kernels.grouped_mm
from benchmarks import __main__ as bench
from benchmarks import common, gpu_check
from kernels.grouped_mm import CPU_PADDED_MAX_ROWS, rule_backend, select_backend

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("device_type,capability,dtype,max_rows,expected", [
    ("cuda", (9, 0), torch.bfloat16, None, "grouped_mm"),  # H100, H200: the grouped kernel
    ("cuda", (10, 0), torch.bfloat16, None, "grouped_mm"),  # B200
    ("cuda", (8, 0), torch.bfloat16, None, "padded"),  # A100: torch loops over the groups
    ("cuda", (8, 9), torch.bfloat16, None, "padded"),  # L40S
    ("cuda", (12, 0), torch.bfloat16, None, "padded"),  # consumer Blackwell: no grouped kernel either
    ("cuda", (9, 0), torch.float32, None, "padded"),  # fp32: the loop even on sm90
    ("cuda", (9, 0), torch.bfloat16, 10_000, "grouped_mm"),  # group sizes do not matter on CUDA
    ("cpu", None, torch.float32, CPU_PADDED_MAX_ROWS, "padded"),
    ("cpu", None, torch.float32, CPU_PADDED_MAX_ROWS + 1, "grouped_mm"),
    ("cpu", None, torch.float32, None, "grouped_mm"),
])
def test_rule_backend_by_compute_capability_and_dtype(device_type, capability, dtype, max_rows, expected):
    assert rule_backend(device_type, capability, dtype, max_rows) == expected


def fake_cuda_tensor(*shape: int, dtype: torch.dtype = torch.bfloat16) -> SimpleNamespace:
    return SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype, shape=shape,
                           element_size=lambda: torch.empty((), dtype=dtype).element_size())


@pytest.mark.parametrize("capability,hip,expected", [((8, 0), None, "padded"), ((9, 0), None, "grouped_mm"),
                                                      ((9, 4), "6.4", "padded")])  # ROCm's gfx942 says 9.4
def test_auto_on_cuda_asks_the_compute_capability(monkeypatch, capability, hip, expected):
    """`auto` on a GPU where torch._grouped_mm runs (as it does on any CUDA GPU, fast or not)."""
    monkeypatch.setattr(kernels.grouped_mm, "_grouped_mm_runs", lambda device_type, dtype: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", hip)
    assert select_backend(fake_cuda_tensor(64, 512), fake_cuda_tensor(4, 512, 1024)) == expected


@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.0), ("NVIDIA H800", 989.4), ("NVIDIA H800 PCIe", 756.0),
    ("NVIDIA B200", 2250.0), ("NVIDIA L40S", 362.05), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA GH200 480GB", 989.4), ("NVIDIA L40", None), ("NVIDIA GeForce RTX 4090", None),
])
def test_datasheet_peak_by_device_name(name, tflops):
    assert common.peak_flops(name) == (None if tflops is None else tflops * 1e12)


def test_gpu_check_fails_where_torch_cannot_use_a_visible_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)  # no nvidia-smi
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert gpu_check.main([]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"torch.version.cuda = {torch.version.cuda}" in err
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")  # no GPU here at all: nothing to check
    assert gpu_check.main([]) == 0


@pytest.fixture
def fake_install(tmp_path):
    """make install with a stub python in a stub venv (it logs its pip commands; `python -c` says: a CPU build)
    and, if asked, a stub nvidia-smi listing a GPU. Returns run(gpu, *make args) -> (result, pip commands)."""
    bin_dir, tools = tmp_path / "venv" / "bin", tmp_path / "tools"
    bin_dir.mkdir(parents=True)
    tools.mkdir()
    log = tmp_path / "pip.log"
    # `python -c` (is torch a CUDA build?) says yes once torch was reinstalled from an index.
    (bin_dir / "python").write_text(f'#!/bin/sh\nif [ "$1" = -c ]; then grep -q force-reinstall {log}; exit; fi\n'
                                    f'echo "$*" >> {log}\n')
    (tools / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\n")
    for stub in (bin_dir / "python", tools / "nvidia-smi"):
        stub.chmod(0o755)

    def run(gpu: bool, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        log.write_text("")
        path = f"{tools}:/usr/bin:/bin" if gpu else "/usr/bin:/bin"
        result = subprocess.run(["make", "-s", "-C", str(REPO), "install", f"VENV={tmp_path / 'venv'}", *args],
                                capture_output=True, text=True, env={**os.environ, "PATH": path})
        return result, log.read_text().splitlines()

    return run


def test_make_install_wants_a_cuda_build_where_there_is_a_gpu(fake_install):
    result, pip = fake_install(True)
    assert result.returncode != 0 and "torch.version.cuda is None" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2  # the line, and make's own
    assert len(pip) == 1  # torch only: nothing reinstalled, the project not installed

    result, pip = fake_install(True, "TORCH_INDEX=https://example.invalid/cu128")
    assert result.returncode == 0, result.stderr
    assert "--index-url https://example.invalid/cu128" in pip[1] and "--force-reinstall" in pip[1]

    result, pip = fake_install(False)  # a CPU machine: torch as it is, never a CUDA build
    assert result.returncode == 0, result.stderr
    assert len(pip) == 2 and not any("index-url" in p or "force-reinstall" in p for p in pip)


def test_benchmark_ranks_start_with_gloo_beside_nccl(monkeypatch, tmp_path):
    """A benchmark's or gpu-check's rank starts through init_distributed: on CUDA the group has gloo for the CPU
    tensors that the trainer all-reduces (NCCL alone refuses them)."""
    backends = []
    init_process_group = dist.init_process_group

    def recorded(backend, **kwargs):  # NCCL does not run here: record what was asked, start gloo
        backends.append(backend)
        init_process_group("gloo", **{**kwargs, "device_id": None})

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "init_process_group", recorded)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(name, "")  # restored after the test
    try:
        runtime = common.init_rank(0, 1, str(tmp_path / "store"), "cuda")
        assert backends == ["cpu:gloo,cuda:nccl"] and runtime.device == torch.device("cuda", 0)
        totals = torch.ones(3)
        dist.all_reduce(totals)  # as accumulate_gradients does with the step's totals
        assert totals.tolist() == [1, 1, 1]
    finally:
        dist.destroy_process_group()


def test_no_benchmark_or_test_rank_starts_its_own_process_group():
    files = [*REPO.glob("benchmarks/*.py"), REPO / "tests" / "distributed.py"]
    assert [f.name for f in files if "init_process_group(" in f.read_text()] == []


def spawned_rank(rank: int, store: str, out: str) -> None:
    atexit.register(lambda: Path(out, "teardown").write_text("ran"))  # only if the interpreter tears down
    sys.stdout = open(Path(out, "stdout"), "w")  # buffered: lost unless flushed before leaving
    common.init_rank(rank, 1, store, "cpu")
    totals = torch.ones(2)
    dist.all_reduce(totals)
    print(json.dumps(totals.tolist()), end="")
    dist.destroy_process_group()


def test_spawned_benchmark_ranks_leave_without_teardown(tmp_path):
    """The gloo teardown abort ("terminate called without an active exception") happens in the interpreter's
    teardown: a benchmark's rank leaves with exit_process, as the trainer does, and never gets there, but
    flushes what it printed first."""
    common.spawn(spawned_rank, (str(tmp_path / "store"), str(tmp_path)), 1)
    assert json.loads((tmp_path / "stdout").read_text()) == [1, 1]
    assert not (tmp_path / "teardown").exists()


def test_gpu_check_writes_each_section_as_it_has_it(monkeypatch, tmp_path):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(gpu_check, "RESULTS_DIR", tmp_path)

    def crash() -> list:
        raise RuntimeError("the second section crashes")

    report = gpu_check.Report("## gpu-check", {"device": "test"})
    with pytest.raises(RuntimeError):
        gpu_check.run_sections(report, [("parity", lambda: [["bfloat16", 8, "grouped_mm", "1e-3"]], str),
                                        ("train_step", crash, str)])
    assert json.loads((tmp_path / "gpu_check-latest.json").read_text())["parity"][0][2] == "grouped_mm"
    assert "grouped_mm" in (tmp_path / "gpu_check-latest.md").read_text()


def test_make_bench_runs_every_benchmark_and_lists_the_failures(monkeypatch, capsys):
    ran = []

    def benchmark(name: str, outcome: int | BaseException):
        def main(argv):
            ran.append(name)
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        return SimpleNamespace(__name__=f"benchmarks.{name}", main=main)

    monkeypatch.setattr(bench, "BENCHMARKS", (benchmark("startup_memory", RuntimeError("a rank died")),
                                              benchmark("usage", SystemExit("usage: one line")),
                                              benchmark("routing", 1), benchmark("prep_throughput", 0)))
    assert bench.main([]) == 1
    assert ran == ["startup_memory", "usage", "routing", "prep_throughput"]
    out = capsys.readouterr().out
    assert "3 failed" in out and "FAILED startup_memory: raised RuntimeError: a rank died" in out
    assert "FAILED usage: usage: one line" in out and "FAILED routing: exit 1" in out
