"""Whole-model training throughput: each tiny MoE against `dense_tiny` (mixtral_tiny's active
parameters per token) in the same run, in one process and on 2 ranks, with where the step
time goes.

Each (model, ranks) is a real `moetrain.train` run of --steps steps with `train.time_phases`
(milliseconds per step of data, forward, backward, grad sync and clip, balance statistics,
optimizer, log) on the generated corpus. The models take turns within each of --rounds rounds,
so the machine's state reaches them alike; tokens/s is the median over every round's log
windows after the first (warm-up) one. Prints one JSON line per (model, ranks) and a table.

    .venv/bin/python scripts/bench_train.py                  # 1 process and 2 ranks (ep=2)
    .venv/bin/python scripts/bench_train.py --nproc 1 --steps 40 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from moetrain.presets import SHIPPED_BALANCE

REPO = Path(__file__).resolve().parents[1]


def run(model: str, nproc: int, steps: int, run_dir: Path, extra: list[str]) -> list[dict]:
    overrides = [f"model={model}", f"balance={SHIPPED_BALANCE.get(model, 'none')}",
                 f"train.steps={steps}", "train.log_every=10", "train.val_every=0",
                 "train.time_phases=true", "checkpoint.at_end=false",
                 "checkpoint.on_preempt=false", "logger.wandb.mode=disabled",
                 "logger.progress_bar=false", "logger.plots=false", f"run_dir={run_dir}"]
    if nproc > 1 and model != "dense_tiny":
        overrides.append(f"parallel.ep={nproc}")
    if nproc == 1:
        command = [sys.executable, "-m", "moetrain.train"]
    else:
        command = [sys.executable, "-m", "moetrain.launcher", "--standalone",
                   "--nproc-per-node", str(nproc), "-m", "moetrain.train"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // nproc))}
    subprocess.run(command + overrides + extra, cwd=REPO, check=True, env=env,
                   stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return [r for r in records if "tokens_per_s" in r][1:]  # the first window warms up


def summarise(windows: list[dict]) -> dict:
    phases = sorted({p for w in windows for p in w["phase_ms"]})
    return {"tokens_per_s": round(statistics.median(w["tokens_per_s"] for w in windows)),
            "windows": len(windows),
            "phase_ms": {p: round(statistics.median(w["phase_ms"].get(p, 0.0) for w in windows),
                                  2) for p in phases}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*",
                        default=["dense_tiny", "mixtral_tiny", "deepseek_tiny"])
    parser.add_argument("--nproc", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="more trainer overrides for every run")
    args = parser.parse_args()
    baseline = args.models[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in args.nproc:
            windows = {m: [] for m in args.models}
            for round_ in range(args.rounds):
                for model in args.models:
                    run_dir = Path(tmp) / f"{model}-{nproc}-{round_}"
                    windows[model] += run(model, nproc, args.steps, run_dir, args.overrides)
            base = summarise(windows[baseline])["tokens_per_s"]
            for model in args.models:
                row = {"model": model, "ranks": nproc, **summarise(windows[model])}
                row[f"vs_{baseline}"] = round(row["tokens_per_s"] / base, 3)
                print(json.dumps(row), flush=True)
                rows.append(row)
    phases = sorted({p for r in rows for p in r["phase_ms"]})
    print(f"\n| model | ranks | tokens/s | vs {baseline} | " + " | ".join(phases) + " |")
    print("|---|---|---|---|" + "---|" * len(phases))
    for r in rows:
        print(f"| {r['model']} | {r['ranks']} | {r['tokens_per_s']:,} | "
              f"{r[f'vs_{baseline}']:.3f} | "
              + " | ".join(f"{r['phase_ms'].get(p, 0.0):.1f}" for p in phases) + " |")


if __name__ == "__main__":
    main()
