#!/usr/bin/env bash
# Single node: one process per GPU (NCCL), or 2 processes on a CPU-only machine (gloo).
#   launch/torchrun.sh [hydra overrides...]            e.g. launch/torchrun.sh model=deepseek_tiny parallel.ep=2
#   NPROC=4 launch/torchrun.sh ...                     choose the number of processes
#   MOETRAIN_ENTRY=scripts/bench_ep.py launch/torchrun.sh   run another script the same way
# Relative paths in the overrides (data, tokenizer, run_dir) are the caller's, as with
# `python -m moetrain.train`: the script stays in the directory it was started from.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/launch/common.sh"
if [ -z "${NPROC:-}" ]; then
    NPROC=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
    [ "$NPROC" -gt 0 ] || NPROC=2
fi
positive_int NPROC "$NPROC"
# moetrain.launcher is torchrun (same options) that checks the config once before starting
# ranks and reports a failed rank in one line (exit 2 for a config or data error).
# torchrun sets OMP_NUM_THREADS=1 per rank unless told otherwise; on CPU that is what we want.
exec "$PYTHON" -m moetrain.launcher --standalone --nproc-per-node "$NPROC" $ENTRY "$@"
