#!/usr/bin/env bash
# One node, all its GPUs (or NPROC CPU processes): launch/single_node.sh --config small [--section.field value ...]
set -euo pipefail
NPROC=${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count() or 8)')}
exec torchrun --standalone --nproc_per_node="$NPROC" --max-restarts="${MAX_RESTARTS:-0}" -m moe_dist.train "$@"
