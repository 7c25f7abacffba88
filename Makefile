# The two commands: `make train` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
NPROC ?= 8
ARGS ?=
BIN := $(VENV)/bin

.PHONY: install train test bench gpu-check clean

# torch goes first, from $(TORCH), so the project's `torch>=2.6` is already satisfied and pip
# never pulls a multi-GB CUDA build on a CPU machine.
install:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"

# The demo job starts runs/tiny over each time (--overwrite); with ARGS you choose, e.g. ARGS=--resume.
# launch/local.sh checks everything once, then runs torchrun --nproc_per_node=$(NPROC) -m moe_dist.train.
train: install
	NPROC=$(NPROC) PYTHON=$(BIN)/python launch/local.sh $(or $(ARGS),--overwrite)

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n auto -q $(ARGS)

# Routing, all-to-all dispatch and training-step benchmarks, minutes on a laptop; ARGS=--full for the
# full sweeps. Markdown tables on stdout, JSON in benchmarks/results/.
bench: install
	$(BIN)/python -m benchmarks $(ARGS)

# The CUDA path on the GPUs at hand: kernel parity, grouped-GEMM speedup, bf16 MFU, NCCL equivalence
# (a few minutes on one GPU; one line and exit 0 without one). JSON and markdown in benchmarks/results/.
gpu-check: install
	$(BIN)/python -m benchmarks.gpu_check

clean:
	rm -rf runs .pytest_cache
