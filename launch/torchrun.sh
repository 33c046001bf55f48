#!/usr/bin/env bash
# Single node: one process per GPU (NCCL), or 2 processes on a CPU-only machine (gloo).
#   launch/torchrun.sh [hydra overrides...]            e.g. launch/torchrun.sh model=deepseek_tiny parallel.ep=2
#   NPROC=4 launch/torchrun.sh ...                     choose the number of processes
#   MOETRAIN_ENTRY=scripts/bench_ep.py launch/torchrun.sh   run another script the same way
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ -z "${NPROC:-}" ]; then
    NPROC=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
    [ "$NPROC" -gt 0 ] || NPROC=2
fi
ENTRY=${MOETRAIN_ENTRY:--m moetrain.train}
# moetrain.launcher is torchrun (same options) that checks the config once before starting
# ranks and reports a failed rank in one line (exit 2 for a config or data error).
# torchrun sets OMP_NUM_THREADS=1 per rank unless told otherwise; on CPU that is what we want.
exec "$PYTHON" -m moetrain.launcher --standalone --nproc-per-node "$NPROC" $ENTRY "$@"
