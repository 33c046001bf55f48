"""Plot expert load from a run directory's metrics.jsonl (works offline, without wandb).

    .venv/bin/python scripts/plot_expert_load.py RUN_DIR [--out DIR]

Writes into RUN_DIR/plots (or --out):
  expert_load_layer{N}.png   per MoE layer: load fraction of each expert over steps
  max_violation.png          global-batch MaxVio per layer over steps
  load_entropy.png           normalised load entropy per layer over steps
  loss.png                   training (and validation) loss
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"plot_expert_load: {path} does not exist; pass a moetrain run dir")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    # A resumed run logs again the steps after its checkpoint: keep the latest of each step.
    latest = {}
    for r in records:
        if "step" in r and "event" not in r:
            latest.setdefault(r["step"], {}).update(r)
    return [latest[s] for s in sorted(latest)]


def plot(run_dir: Path, out: Path) -> list[Path]:
    records = read_records(run_dir)
    moe = [r for r in records if "moe" in r]
    out.mkdir(parents=True, exist_ok=True)
    written = []

    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.legend()
    written.append(_save(fig, out / "loss.png"))
    if not moe:
        return written

    steps = [r["step"] for r in moe]
    layers = moe[0]["moe"]["layers"]
    load = np.array([r["moe"]["load_fraction"] for r in moe])  # (steps, L, E)
    num_experts = load.shape[-1]
    for i, layer in enumerate(layers):
        fig, ax = plt.subplots(figsize=(max(6, len(steps) * 0.15), max(3, num_experts * 0.12)))
        image = ax.imshow(load[:, i, :].T * num_experts, aspect="auto", origin="lower",
                          cmap="viridis", vmin=0, vmax=2,
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, num_experts - 0.5))
        fig.colorbar(image, ax=ax, label="load / fair share")
        ax.set(xlabel="step", ylabel="expert", title=f"layer {layer}: expert load")
        written.append(_save(fig, out / f"expert_load_layer{layer}.png"))

    for key, name, label in (("max_violation_global", "max_violation.png",
                              "MaxVio (global batch)"),
                             ("load_entropy", "load_entropy.png", "normalised load entropy")):
        fig, ax = plt.subplots(figsize=(6, 4))
        values = np.array([r["moe"][key] for r in moe])
        for i, layer in enumerate(layers):
            ax.plot(steps, values[:, i], label=f"layer {layer}")
        ax.set(xlabel="step", ylabel=label, title=label)
        ax.legend(fontsize="small")
        written.append(_save(fig, out / name))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    for path in plot(args.run_dir, args.out or args.run_dir / "plots"):
        print(path)


if __name__ == "__main__":
    sys.exit(main())
