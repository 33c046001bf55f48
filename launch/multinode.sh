#!/usr/bin/env bash
# Several nodes: run this once on every node with the same MASTER_ADDR / MASTER_PORT.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 launch/multinode.sh [overrides...]
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 MASTER_PORT=29500 launch/multinode.sh [overrides...]
# NPROC_PER_NODE defaults to the node's GPU count (2 without GPUs). RDZV_ID names the job.
# Relative paths in the overrides are the caller's: the script stays where it was started.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/launch/common.sh"
for var in NNODES NODE_RANK MASTER_ADDR; do
    if [ -z "${!var:-}" ]; then
        echo "multinode.sh: set $var (e.g. NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/multinode.sh ...)" >&2
        exit 2
    fi
done
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
    [ "$NPROC_PER_NODE" -gt 0 ] || NPROC_PER_NODE=2
fi
positive_int NNODES "$NNODES"
positive_int NPROC_PER_NODE "$NPROC_PER_NODE"
positive_int MASTER_PORT "$MASTER_PORT"
if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || [ "$NODE_RANK" -ge "$NNODES" ]; then
    echo "multinode.sh: NODE_RANK=$NODE_RANK must be an integer from 0 to NNODES-1 ($((NNODES - 1)))" >&2
    exit 2
fi
exec "$PYTHON" -m moetrain.launcher \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
    --rdzv-id "${RDZV_ID:-moetrain}" --max-restarts "${MAX_RESTARTS:-0}" \
    $ENTRY "$@"
