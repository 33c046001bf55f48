"""The two built-in experiments, each one command that writes a table and a comparison plot.

    .venv/bin/python scripts/run_experiment.py moe_vs_dense [--nproc 2] [--out DIR] [overrides]
    .venv/bin/python scripts/run_experiment.py balancing    [--nproc 2] [--out DIR] [overrides]

moe_vs_dense: dense_tiny, mixtral_tiny and deepseek_tiny (equal active parameters per token)
              on the same tokens; validation loss and tokens/s.
balancing:    deepseek_tiny with no balancing, the Switch aux loss, and aux-loss-free bias;
              validation loss, global MaxVio over training and dead experts.
Each variant is one torchrun job (configs/experiment/<name>.yaml plus its overrides); extra
overrides apply to all of them. Writes OUT/results.md, OUT/results.json and OUT/comparison.png
(default OUT: runs/experiments/<name>).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from plot_expert_load import read_records  # noqa: E402

EXPERIMENTS = {
    "moe_vs_dense": {
        "dense_tiny": ["model=dense_tiny", "balance=none"],
        "mixtral_tiny": ["model=mixtral_tiny", "balance=switch_aux"],
        "deepseek_tiny": ["model=deepseek_tiny", "balance=aux_free"],
    },
    "balancing": {
        "none": ["balance=none"],
        "switch_aux": ["balance=switch_aux"],
        "aux_free": ["balance=aux_free"],
    },
}


def run_variant(name, variant, overrides, extra, out: Path, nproc: int) -> Path:
    run_dir = out / variant
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(nproc), "-m", "moetrain.train", f"experiment={name}",
           *overrides, *extra, f"run_dir={run_dir}", f"name={name}-{variant}"]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    return run_dir


def summarise(run_dir: Path) -> dict:
    records = read_records(run_dir)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    speed = [r["tokens_per_s"] for r in train[1:]]  # the first window includes warm-up
    row = {"val_loss": val[-1]["val_loss"], "train_loss": train[-1]["loss"],
           "tokens_per_s": sum(speed) / len(speed), "steps": train[-1]["step"],
           "tokens": train[-1]["tokens_seen"]}
    moe = [r["moe"] for r in train if "moe" in r]
    if moe:
        per_step = [sum(m["max_violation_global"]) / len(m["max_violation_global"]) for m in moe]
        row["max_violation_mean"] = sum(per_step) / len(per_step)
        row["max_violation_last"] = per_step[-1]
        row["dead_experts_last"] = sum(moe[-1]["dead_experts"])
    return row


def write_report(name: str, rows: dict, runs: dict, out: Path) -> None:
    keys = ["val_loss", "train_loss", "tokens_per_s", "max_violation_mean",
            "max_violation_last", "dead_experts_last"]
    lines = ["| variant | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for variant, row in rows.items():
        cells = []
        for key in keys:
            value = row.get(key)
            cells.append("-" if value is None else f"{value:.0f}" if key == "tokens_per_s"
                         else f"{value}" if isinstance(value, int) else f"{value:.3f}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print(table)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for variant, run_dir in runs.items():
        records = read_records(run_dir)
        val = [r for r in records if "val_loss" in r]
        axes[0].plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-",
                     label=variant)
        moe = [r for r in records if "moe" in r]
        if moe:
            axes[1].plot([r["step"] for r in moe],
                         [sum(r["moe"]["max_violation_global"]) /
                          len(r["moe"]["max_violation_global"]) for r in moe], label=variant)
    axes[0].set(xlabel="step", ylabel="validation loss", title=f"{name}: validation loss")
    axes[1].set(xlabel="step", ylabel="MaxVio (global batch, mean over layers)",
                title=f"{name}: load balance", yscale="log")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=100)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every variant")
    args = parser.parse_args(argv)
    out = args.out or REPO / "runs" / "experiments" / args.experiment
    out.mkdir(parents=True, exist_ok=True)
    runs = {variant: run_variant(args.experiment, variant, overrides, args.overrides, out,
                                 args.nproc)
            for variant, overrides in EXPERIMENTS[args.experiment].items()}
    write_report(args.experiment, {v: summarise(d) for v, d in runs.items()}, runs, out)


if __name__ == "__main__":
    main()
