"""Plot a run's loss and expert load from its metrics.jsonl (works offline, without wandb).

    .venv/bin/python scripts/plot_expert_load.py RUN_DIR [--out DIR]

Writes into RUN_DIR/plots (or --out), and prints each path written:
  loss.png                   training and validation cross-entropy (nats/token); resumes marked
  expert_load_layer{N}.png   per MoE layer: each expert's load / fair share over steps, on a
                             log scale centred on the fair share; collapses marked
  max_violation.png          global-batch MaxVio per layer over steps; collapses marked
  load_entropy.png           normalised load entropy per layer over steps; collapses marked
A dense run gets loss.png only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moetrain.plots import read_records, write_plots

__all__ = ["main", "read_records"]  # read_records: scripts/run_experiment.py imports it here


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/plots")
    args = parser.parse_args(argv)
    try:
        written = write_plots(args.run_dir, args.out)
    except ValueError as error:
        raise SystemExit(f"plot_expert_load: {error}") from None
    if not written:
        print(f"plot_expert_load: {args.run_dir / 'metrics.jsonl'} holds no step record yet; "
              "nothing to plot", file=sys.stderr)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
