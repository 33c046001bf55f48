"""Does load balancing hold from the first steps? The tiny families on real text, each at
its old and its shipped default (and, with `--sets ... alternatives`, the other settings
compared when the default was chosen), then one table.

    .venv/bin/python scripts/bench_balance_start.py [--data-path FILE] [--steps 300]
        [--seeds 0 1] [--jobs 2] [--sets old new alternatives] [--out DIR] [-- hydra overrides]

Data: --data-path, a text file (data=local_text with its built-in BPE, and --sample-by, by
default document), or else data=python_stdlib (the running Python's standard library
sources). Every run is one process
(`python -m moetrain.train`, OMP_NUM_THREADS=1, its output in OUT/<run>/log.txt), --jobs at a
time; variants that compose to the same model.balance run once. Each run logs the global expert
loads every step and validates every 50 steps and at the end on --val-batches batches (the
same held-out blocks for every run). Trailing Hydra overrides apply to every run:
`train.grad_accum=2` gives one process the global batch of two ranks at the default
micro-batch (the issue's setting).

Columns: dead experts at step 30 and the most at any step from 30 on (summed over layers); the
worst layer's MaxVio (max_load / mean_load - 1 of the step's global batch) at steps 10/30/50 and
at the last step; the first step at which its mean over the last 10 steps is below 0.5; the
worst layer's MaxVio on the loads of a whole validation pass (--val-batches batches; the paper's
MaxVio_global) at step 50 and at the end; collapse warnings (the monitor's, checked every step
here); validation cross-entropy in nats per token and per byte of the text.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BALANCED_MAX_VIOLATION = 0.5  # "balanced": the worst layer's MaxVio below this ...
BALANCE_WINDOW = 10  # ... on average over this many consecutive steps
DEAD_AT_STEP = 30
MAX_VIOLATION_STEPS = (10, 30, 50)
VAL_EVERY = 50  # validation loss and loads; the first pass gives the validation MaxVio at step 50


@dataclass(frozen=True)
class Variant:
    family: str  # configs/model/<family>.yaml
    label: str
    overrides: tuple[str, ...]  # Hydra overrides after model=<family>


# The defaults before balance.bias_update and model.embed_init_std existed, spelled out so
# that they stay reproducible whatever ships now.
OLD_INIT = "model.embed_init_std=0.02"
OLD_DEFAULTS = [
    Variant("deepseek_tiny", "old default: sign, gamma 1e-3, embed std 0.02",
            ("balance=aux_free", "model.balance.bias_update=sign",
             "model.balance.bias_update_rate=0.001", "model.balance.aux_loss=none", OLD_INIT)),
    Variant("mixtral_tiny", "old default: switch 0.01, z 1e-3, embed std 0.02",
            ("balance=switch_aux", "model.balance.aux_loss_coef=0.01",
             "model.balance.z_loss_coef=0.001", OLD_INIT)),
]
NEW_DEFAULTS = [
    Variant("deepseek_tiny", "new default (balance=aux_free)", ("balance=aux_free",)),
    Variant("mixtral_tiny", "new default (balance=switch_aux)", ("balance=switch_aux",)),
]
ALTERNATIVES = [
    # the shipped balancing before the BPE runs of 2026-11-24 moved its coefficients
    Variant("deepseek_tiny", "seq aux 1e-4 (the previous default)",
            ("balance=aux_free", "model.balance.aux_loss_coef=0.0001")),
    Variant("mixtral_tiny", "Switch 0.01 (the previous default)",
            ("balance=switch_aux", "model.balance.aux_loss_coef=0.01")),
    Variant("deepseek_tiny", "default balance, embed std 0.02", ("balance=aux_free", OLD_INIT)),
    Variant("mixtral_tiny", "default balance, embed std 0.02", ("balance=switch_aux", OLD_INIT)),
    Variant("deepseek_tiny", "sign, gamma 1e-2",
            ("balance=aux_free", "model.balance.bias_update=sign",
             "model.balance.bias_update_rate=0.01", "model.balance.aux_loss=none")),
    Variant("deepseek_tiny", "sign 1e-3 + seq aux 1e-4 (V3 paper)",
            ("balance=aux_free", "model.balance.bias_update=sign",
             "model.balance.bias_update_rate=0.001", "model.balance.aux_loss=sequence",
             "model.balance.aux_loss_coef=0.0001", "model.balance.seq_aux_counts=raw_topk")),
    Variant("deepseek_tiny", "proportional, no seq aux",
            ("balance=aux_free", "model.balance.aux_loss=none")),
]


def data_overrides(args) -> list[str]:
    if args.data_path:
        path = Path(args.data_path).resolve()
        if not path.is_file():
            raise SystemExit(f"--data-path {args.data_path}: no such file")
        return ["data=local_text", f"data.path={path}", f"data.sample_by={args.sample_by}"]
    if (REPO / "configs" / "data" / "python_stdlib.yaml").exists():
        return ["data=python_stdlib"]
    raise SystemExit("no real text: pass --data-path FILE (e.g. the standard library's .py files "
                     "concatenated) or add configs/data/python_stdlib.yaml")


def run_dir_name(variant: Variant, seed: int) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in variant.label.lower())
    return f"{variant.family}--{'-'.join(filter(None, slug.split('-')))}--seed{seed}"


def command(variant: Variant, seed: int, args, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "moetrain.train", f"model={variant.family}",
            *variant.overrides, *data_overrides(args), "logger=none", "logger.plots=false",
            f"train.steps={args.steps}", "train.log_every=1", f"train.val_every={VAL_EVERY}",
            f"train.val_batches={args.val_batches}", f"train.seed={seed}",
            "checkpoint.at_end=false", "checkpoint.on_preempt=false", f"run_dir={run_dir}",
            *args.overrides]


def balance_of(variant: Variant) -> dict:
    """The composed model.balance: two variants that compose to the same one are one run."""
    from moetrain.train.cli import config_from_overrides
    cfg = config_from_overrides([f"model={variant.family}", *variant.overrides])
    return vars(cfg.model.balance)


def run_all(variants: list[Variant], args, out: Path) -> dict[tuple[Variant, int], Path]:
    """Run each distinct configuration once per seed, --jobs at a time; returns the run of
    each (variant, seed)."""
    owners: dict[Variant, Variant] = {}
    first: dict[tuple, Variant] = {}  # one run per distinct (family, composed balance)
    for variant in variants:
        key = (variant.family, json.dumps(balance_of(variant), sort_keys=True))
        owners[variant] = first.setdefault(key, variant)
    runs = {(v, seed): out / run_dir_name(owners[v], seed) for v in variants for seed in args.seeds}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pending = [(v, seed) for seed in args.seeds for v in first.values()]
    active: list[tuple[subprocess.Popen, Variant, Path, float]] = []
    while pending or active:
        while pending and len(active) < args.jobs:
            variant, seed = pending.pop(0)
            run_dir = runs[(variant, seed)]
            run_dir.mkdir(parents=True, exist_ok=True)
            for stale in ("metrics.jsonl", "config.yaml"):
                (run_dir / stale).unlink(missing_ok=True)
            log = open(run_dir / "log.txt", "w")
            proc = subprocess.Popen(command(variant, seed, args, run_dir), cwd=REPO, env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
            active.append((proc, variant, run_dir, time.time()))
            print(f"started {run_dir.name}", flush=True)
        time.sleep(1)
        for item in list(active):
            proc, variant, run_dir, started = item
            if proc.poll() is None:
                continue
            active.remove(item)
            status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            print(f"{status} in {time.time() - started:.0f} s: {run_dir.name}; log "
                  f"{run_dir / 'log.txt'}", flush=True)
    return runs


def steps_to_balance(steps: list[int], worst: list[float]) -> int | None:
    """The first step at which the worst layer's MaxVio, averaged over the last
    BALANCE_WINDOW logged steps, is below 0.5 (one step's global batch is small enough that
    single steps spike above it long after the balance holds)."""
    for i in range(BALANCE_WINDOW - 1, len(worst)):
        window = worst[i - BALANCE_WINDOW + 1:i + 1]
        if sum(window) / BALANCE_WINDOW < BALANCED_MAX_VIOLATION:
            return steps[i]
    return None


def summarise(run_dir: Path) -> dict | None:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    moe = [r for r in records if "moe" in r]
    if not moe:
        return None
    steps = [r["step"] for r in moe]
    worst = [max(r["moe"]["max_violation_global"]) for r in moe]
    by_step = dict(zip(steps, worst))
    dead = {r["step"]: sum(r["moe"]["dead_experts"]) for r in moe}
    val = [r for r in records if "val_loss" in r]
    # the worst layer's MaxVio on the loads of a whole validation pass (the paper's
    # MaxVio_global): what the bias balanced, without one training batch's composition
    val_mv = {r["step"]: max(r["val_moe"]["max_violation"]) for r in records if "val_moe" in r}
    return {
        "dead_at_30": dead.get(DEAD_AT_STEP),
        "dead_after_30": max((d for s, d in dead.items() if s >= DEAD_AT_STEP), default=None),
        **{f"mv_{s}": by_step.get(s) for s in MAX_VIOLATION_STEPS},
        "mv_last": worst[-1], "last_step": steps[-1],
        "steps_to_balance": steps_to_balance(steps, worst),
        "val_mv_50": val_mv.get(VAL_EVERY), "val_mv_last": val_mv.get(steps[-1]),
        "collapse_warnings": sum(r.get("event") == "collapse" for r in records),
        "val_nats_per_token": val[-1]["val_loss"] if val else None,
        # the trainer's bits per byte of the validated text: comparable across tokenizers
        "val_nats_per_byte": (val[-1]["val_bits_per_byte"] * math.log(2)
                              if val and "val_bits_per_byte" in val[-1] else None),
    }


def fmt(value, digits=2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(variants: list[Variant], seeds: list[int], runs: dict, steps: int) -> str:
    header = ["family", "variant", "seed", f"dead@{DEAD_AT_STEP}", "max dead >=30",
              *[f"MaxVio@{s}" for s in MAX_VIOLATION_STEPS], f"MaxVio@{steps}",
              f"step mean{BALANCE_WINDOW}<{BALANCED_MAX_VIOLATION}", f"val MaxVio@{VAL_EVERY}",
              f"val MaxVio@{steps}", "collapse warn", "val nats/tok",
              "val nats/byte"]
    rows = []
    for variant in variants:
        for seed in seeds:
            s = summarise(runs[(variant, seed)])
            if s is None:
                rows.append([variant.family, variant.label, seed, "no metrics"]
                            + [""] * (len(header) - 4))
                continue
            rows.append([variant.family, variant.label, seed, fmt(s["dead_at_30"]),
                         fmt(s["dead_after_30"]),
                         *[fmt(s[f"mv_{step}"]) for step in MAX_VIOLATION_STEPS],
                         fmt(s["mv_last"]), fmt(s["steps_to_balance"]), fmt(s["val_mv_50"]),
                         fmt(s["val_mv_last"]),
                         fmt(s["collapse_warnings"]), fmt(s["val_nats_per_token"], 4),
                         fmt(s["val_nats_per_byte"], 4)])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", help="a text file (default: data=python_stdlib)")
    parser.add_argument("--sample-by", default="document", choices=("line", "paragraph",
                                                                      "document"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--val-batches", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, one thread each")
    parser.add_argument("--families", nargs="+", default=["deepseek_tiny", "mixtral_tiny"])
    parser.add_argument("--sets", nargs="+", default=["old", "new"],
                        choices=("old", "new", "alternatives"),
                        help="old and new defaults, and the alternatives compared when the "
                             "defaults were chosen")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench_balance_start"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args(argv)
    if args.steps < max(MAX_VIOLATION_STEPS):
        parser.error(f"--steps {args.steps}: the table reads step {max(MAX_VIOLATION_STEPS)}")
    data_overrides(args)  # fail before any run
    sets = {"old": OLD_DEFAULTS, "new": NEW_DEFAULTS, "alternatives": ALTERNATIVES}
    variants = [v for name in args.sets for v in sets[name] if v.family in args.families]
    out = Path(args.out)
    runs = run_all(variants, args, out)
    result = table(variants, args.seeds, runs, args.steps)
    print(result)
    (out / "table.txt").write_text(result + "\n")
    return result


if __name__ == "__main__":
    main()
