#!/usr/bin/env bash
# One node: launch/local.sh [--config NAME] [--section.field value ...] [--resume | --overwrite]
#   One process per GPU when the node has GPUs (NCCL); otherwise one per CPU core (gloo), or NPROC of them.
#   NPROC=4 launch/local.sh --config tiny          four CPU processes
#   launch/local.sh --config small --train.name s1  every GPU of this node
# Environment: NPROC (process count), PYTHON (default: this repo's .venv, else python3), MAX_RESTARTS (0).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
[[ -x $python ]] || python=python3
gpus=$("$python" -c 'import torch; print(torch.cuda.device_count())')
if (( gpus > 0 )); then default=$gpus; else default=$(nproc); fi
exec "$python" -m torch.distributed.run --standalone --nproc_per_node="${NPROC:-$default}" \
    --max-restarts="${MAX_RESTARTS:-0}" -m moe_dist.train "$@"
