#!/usr/bin/env bash
# One node: launch/local.sh [--config NAME] [--section.field value ...] [--resume | --overwrite]
#   One process per GPU when the node has GPUs (NCCL); otherwise one per CPU core (gloo), or NPROC of them.
#   NPROC=4 launch/local.sh --config tiny          four CPU processes
#   launch/local.sh --config small --train.name s1  every GPU of this node
# The start-up checks run once before torchrun starts the ranks (bad input: one line, exit code 2), and
# SIGTERM to this script makes the ranks save a checkpoint and exit 0 (python -m moe_dist.launch).
# Environment: NPROC (process count), PYTHON (default: this repo's .venv, else python3), MAX_RESTARTS (0).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
[[ -x $python ]] || python=python3
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # moe_dist from this checkout, wherever you run it
exec "$python" -m moe_dist.launch --nproc "${NPROC:-0}" --max-restarts "${MAX_RESTARTS:-0}" "$@"
