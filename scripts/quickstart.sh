#!/usr/bin/env bash
# One command from a fresh clone: set up .venv, train the default tiny MoE (mixtral_tiny) on
# the generated corpus with 2 CPU ranks (one rank per GPU where GPUs exist); the run writes its
# plots to RUN_DIR/plots at the end.
#   scripts/quickstart.sh                         # defaults
#   scripts/quickstart.sh model=deepseek_tiny balance=aux_free parallel.ep=2
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
RUN_DIR=${RUN_DIR:-runs/quickstart-$(date +%Y%m%d-%H%M%S)}
exec launch/torchrun.sh "run_dir=$RUN_DIR" "$@"
