# The two commands: `make train` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# Where torch comes from, if not pip's default index: e.g. https://download.pytorch.org/whl/cu128 for a CUDA build.
TORCH_INDEX ?=
NPROC ?= 8
ARGS ?=
BIN := $(VENV)/bin

.PHONY: install train test bench gpu-check clean

PIP_TORCH = $(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
CUDA_TORCH = $(BIN)/python -c 'import sys, torch; sys.exit(torch.version.cuda is None)'

# torch goes first, from $(TORCH), so the project's `torch>=2.6` is already satisfied and pip
# never pulls a multi-GB CUDA build on a CPU machine. Where nvidia-smi lists a GPU, torch must be a CUDA build
# (a CPU wheel left in the venv or found first by pip would run every GPU path on the CPU): with TORCH_INDEX it is
# reinstalled from there, without it install stops with one line. Without nvidia-smi nothing is checked.
install:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_TORCH)
	@if timeout 20 nvidia-smi -L 2>/dev/null | grep -q '^GPU ' && ! $(CUDA_TORCH); then \
	  if [ -z "$(TORCH_INDEX)" ]; then \
	    echo "install: nvidia-smi lists a GPU but $(TORCH) in $(VENV) is a CPU build (torch.version.cuda is None):" \
	      "make install TORCH_INDEX=https://download.pytorch.org/whl/cu128 (a CUDA version the driver runs)" >&2; \
	    exit 1; \
	  fi; \
	  $(PIP_TORCH) --force-reinstall && $(CUDA_TORCH) || { \
	    echo "install: $(TORCH) from $(TORCH_INDEX) is still not a CUDA build (torch.version.cuda is None)" >&2; \
	    exit 1; }; \
	fi
	$(BIN)/python -m pip install -q -e ".[dev]"

# The demo job starts runs/tiny over each time (--overwrite); with ARGS you choose, e.g. ARGS=--resume.
# launch/local.sh checks everything once, then runs torchrun --nproc_per_node=$(NPROC) -m moe_dist.train.
train: install
	NPROC=$(NPROC) PYTHON=$(BIN)/python launch/local.sh $(or $(ARGS),--overwrite)

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n auto -q $(ARGS)

# Routing, all-to-all dispatch and training-step benchmarks, minutes on a laptop; ARGS=--full for the
# full sweeps. Markdown tables on stdout, JSON in benchmarks/results/. Every benchmark runs even when one fails;
# the failures are listed at the end and the exit status is 1.
bench: install
	$(BIN)/python -m benchmarks $(ARGS)

# The CUDA path on the GPUs at hand: kernel parity, auto's backend, grouped-GEMM speedup, bf16 MFU, NCCL equivalence
# (a few minutes on one GPU; one line and exit 0 without one, exit 1 where a GPU is visible that torch cannot use).
# JSON and markdown in benchmarks/results/, written after each section.
gpu-check: install
	$(BIN)/python -m benchmarks.gpu_check

clean:
	rm -rf runs .pytest_cache
