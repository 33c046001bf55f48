"""The two built-in experiments, each one command: every variant for every seed, then a table
of mean ± std over seeds and the pictures.

    .venv/bin/python scripts/run_experiment.py balancing    [--seeds 0 1 2] [--jobs 2] [--nproc 1]
    .venv/bin/python scripts/run_experiment.py moe_vs_dense [--out DIR] [hydra overrides]

balancing:    one DeepSeek-style model (sigmoid router) with no balancing, the Switch aux loss,
              aux-loss-free bias as in the paper (gamma 1e-3) and as shipped (balance=aux_free).
moe_vs_dense: dense_tiny, the Mixtral-style and DeepSeek-style MoEs at equal active FFN width
              (512), and a dense model 4x as wide (the control for "more parameters help").

Each run is `python -m moetrain.train experiment=<name> train.seed=S data.seed=S <variant>
<overrides>` in OUT/<variant>/seed<S> (its output in log.txt there), one thread per process,
--jobs runs at a time (default: one per core); --nproc N makes each run an N-rank job through
moetrain.launcher. Sizes, steps and data are in configs/experiment/<name>.yaml. Writes
OUT/results.md (mean ± std per variant), OUT/results.json (the per-seed values too),
OUT/comparison.png and OUT/heatmaps.png; default OUT: runs/experiments/<name>.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

# The load colour bar and cell edges are private helpers of moetrain.plots: reused so that these
# heatmaps read exactly like a run's own plots/expert_load_layer*.png.
from moetrain.plots import (_add_load_colorbar, _cell_edges, load_cmap, load_norm,
                            read_metrics, read_records)

REPO = Path(__file__).resolve().parents[1]
BALANCED_MAX_VIOLATION = 0.5  # "balanced": the worst layer's MaxVio below this, and staying so
DEAD_AT_STEP = 30  # early collapse: dead experts at this step (it must be a logged step)
TRAIN_LOSS_WINDOW = 5  # final train loss: mean of this many last logged steps (one is noisy)
DEAD_AT_KEY = f"dead_experts_step{DEAD_AT_STEP}"
LOG_TAIL_LINES = 30


@dataclass(frozen=True)
class Experiment:
    question: str
    variants: dict[str, list[str]]  # name -> Hydra overrides, before the user's own
    baseline: str | None = None  # validation-loss gaps are against it, paired by seed


EXPERIMENTS = {
    "balancing": Experiment(
        question="How well does each balancer spread the load, how fast, and at what cost in "
                 "loss? (DeepSeek-style model: sigmoid router, 32 experts, top-6 in groups, "
                 "2 shared)",
        variants={
            "none": ["balance=none"],
            "switch_aux": ["balance=switch_aux"],
            # The paper's setting (Wang et al. 2024, DeepSeek-V3), pinned so that a change to
            # aux_free.yaml's defaults does not change this variant: the bias alone (no
            # auxiliary or z-loss), sign update with gamma 1e-3, no centring.
            "aux_free_1e-3": ["balance=aux_free", "model.balance.aux_loss=none",
                              "model.balance.z_loss_coef=0", "model.balance.bias_center=false",
                              "model.balance.bias_update=sign",
                              "model.balance.bias_update_rate=0.001"],
            "aux_free_default": ["balance=aux_free"],  # as shipped
        },
        baseline="switch_aux",
    ),
    "moe_vs_dense": Experiment(
        question="At equal active compute (FFN width 512 per token), does an MoE beat a dense "
                 "model on the same tokens? (dense_4x: a dense model with 4x the FFN width, "
                 "all of it active: whether more parameters help at this budget at all)",
        variants={
            "dense": ["model=dense_tiny", "balance=none"],
            "dense_4x": ["model=dense_tiny", "balance=none", "model.ffn_hidden=2048"],
            "mixtral": ["model=mixtral_tiny", "balance=switch_aux"],
            "deepseek": ["model=deepseek_tiny", "balance=aux_free"],
        },
        baseline="dense",
    ),
}


# ---- running -------------------------------------------------------------------------------

@dataclass
class Job:
    variant: str
    seed: int
    run_dir: Path
    command: list[str]
    process: subprocess.Popen | None = None
    started: float = 0.0


def plan_jobs(experiment: str, seeds: list[int], overrides: list[str], out: Path,
              nproc: int) -> list[Job]:
    """Seed by seed, each seed's variants in the order listed (with a greedy pool this keeps
    the long runs spread out rather than all at the end). The user's overrides come after the
    variant's, so they win."""
    spec = EXPERIMENTS[experiment]
    launcher = (["-m", "moetrain.launcher", "--standalone", "--nproc-per-node", str(nproc)]
                if nproc > 1 else [])
    jobs = []
    for seed in seeds:
        for variant, variant_overrides in spec.variants.items():
            run_dir = out / variant / f"seed{seed}"
            command = [sys.executable, *launcher, "-m", "moetrain.train",
                       f"experiment={experiment}", f"train.seed={seed}", f"data.seed={seed}",
                       *variant_overrides, *overrides, f"run_dir={run_dir}",
                       f"name={experiment}-{variant}-seed{seed}"]
            jobs.append(Job(variant, seed, run_dir, command))
    return jobs


def run_jobs(jobs: list[Job], parallel: int) -> None:
    """Runs `jobs`, `parallel` at a time. Each starts in an empty run directory (a rerun
    replaces it: metrics.jsonl is appended to, so old records would mix in) and writes its
    output to RUN_DIR/log.txt. The first failure stops the others and exits non-zero with the
    failed run's last lines."""
    # One thread per process: the jobs, not the threads, fill the cores (ranks of an
    # --nproc job get one each as well).
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    pending, running, finished = list(jobs), [], 0
    try:
        while pending or running:
            while pending and len(running) < parallel:
                job = pending.pop(0)
                start(job, env)
                running.append(job)
            time.sleep(0.2)
            for job in [j for j in running if j.process.poll() is not None]:
                running.remove(job)
                if job.process.returncode != 0:
                    fail(job)
                finished += 1
                print(f"done  {job.variant} seed {job.seed} in "
                      f"{time.monotonic() - job.started:.0f} s ({finished}/{len(jobs)})",
                      flush=True)
    finally:
        for job in running:  # after a failure or Ctrl-C
            if job.process.poll() is None:
                job.process.terminate()
        for job in running:
            job.process.wait()


def start(job: Job, env: dict) -> None:
    shutil.rmtree(job.run_dir, ignore_errors=True)
    job.run_dir.mkdir(parents=True)
    with open(job.run_dir / "log.txt", "w") as log:
        log.write("$ python " + " ".join(job.command[1:]) + "\n")
        log.flush()
        job.process = subprocess.Popen(job.command, cwd=REPO, env=env, stdout=log,
                                       stderr=subprocess.STDOUT)
    job.started = time.monotonic()
    print(f"start {job.variant} seed {job.seed}: {job.run_dir}", flush=True)


def fail(job: Job) -> None:
    lines = (job.run_dir / "log.txt").read_text(errors="replace").splitlines()
    print("\n".join(lines[-LOG_TAIL_LINES:]), file=sys.stderr)
    raise SystemExit(f"run_experiment: {job.variant} seed {job.seed} failed (exit code "
                     f"{job.process.returncode}); its log: {job.run_dir / 'log.txt'}")


# ---- one run's figures, and their mean ± std over seeds ------------------------------------

def summarise_records(records: list[dict]) -> dict:
    """The summary figures of one run from its step records (metrics.jsonl). MaxVio is on the
    global batch; "end" and steps_to_balance use the worst MoE layer, the mean the layers'
    mean. The validation MaxVio (the paper's MaxVio_global) is the layers' mean of MaxVio of
    the loads over the last validation pass. Dead experts (no token in a step) are summed over
    layers. Keys that do not apply (no MoE layer, no validation) are absent or None."""
    loss_key = "ce_loss" if any("ce_loss" in r for r in records) else "loss"
    train = [r for r in records if loss_key in r]
    val = [r for r in records if "val_loss" in r]
    speed = [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
    summary = {
        "steps": train[-1]["step"],
        "tokens": train[-1]["tokens_seen"],
        "val_loss": val[-1]["val_loss"] if val else None,
        # per byte of the validated text: comparable across tokenizers
        "val_nats_per_byte": (val[-1]["val_bits_per_byte"] * math.log(2)
                              if val and "val_bits_per_byte" in val[-1] else None),
        # the cross-entropy alone (no auxiliary loss), so runs with and without one compare
        "train_loss": statistics.fmean(r[loss_key] for r in train[-TRAIN_LOSS_WINDOW:]),
        "tokens_per_s": statistics.fmean(speed[1:] or speed),  # the first window has warm-up
    }
    moe = [r for r in train if "moe" in r]
    if moe:
        worst = [max(r["moe"]["max_violation_global"]) for r in moe]
        summary["max_violation_mean"] = statistics.fmean(
            statistics.fmean(r["moe"]["max_violation_global"]) for r in moe)
        summary["max_violation_end"] = worst[-1]
        summary["steps_to_balance"] = steps_to_balance([r["step"] for r in moe], worst)
        at = [r for r in moe if r["step"] == DEAD_AT_STEP]
        summary[DEAD_AT_KEY] = sum(at[0]["moe"]["dead_experts"]) if at else None
        summary["dead_experts_end"] = sum(moe[-1]["moe"]["dead_experts"])
    val_moe = [r for r in val if "val_moe" in r]
    if val_moe:  # the paper's MaxVio_global: loads over the whole validation pass
        summary["val_max_violation_end"] = statistics.fmean(
            val_moe[-1]["val_moe"]["max_violation"])
    return summary


def steps_to_balance(steps: list[int], max_violation: list[float]) -> int | None:
    """The first logged step from which MaxVio stays below BALANCED_MAX_VIOLATION to the end
    of the run; None if the last one is not below it."""
    last_above = max((i for i, v in enumerate(max_violation) if v >= BALANCED_MAX_VIOLATION),
                     default=-1)
    return steps[last_above + 1] if last_above + 1 < len(steps) else None


def model_params(run_dir: Path) -> dict[str, int]:
    """Total and active-per-token parameters of the run's model (built on the meta device
    from RUN_DIR/config.yaml: no weights allocated)."""
    import torch
    from omegaconf import OmegaConf

    from moetrain.config import RunConfig
    from moetrain.model import Transformer, num_params
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig),
                                              OmegaConf.load(run_dir / "config.yaml")))
    with torch.device("meta"):
        counts = num_params(Transformer(cfg.model))
    return {"params_total": counts["total"], "params_active": counts["active"]}


def summarise(run_dir: Path) -> dict:
    return {**summarise_records(read_records(run_dir)), **model_params(run_dir)}


def aggregate(values: list[float | None]) -> dict:
    """Mean and sample standard deviation (n - 1; None below 2 values) over the seeds with a
    value; n counts them (a run that never balanced has no steps_to_balance)."""
    present = [v for v in values if v is not None]
    return {"mean": statistics.fmean(present) if present else None,
            "std": statistics.stdev(present) if len(present) >= 2 else None,
            "n": len(present)}


def aggregate_variants(per_seed: dict[str, list[dict]], baseline: str | None) -> dict:
    """variant -> {"per_seed": {key: [value per seed]}, "summary": {key: aggregate}}. With a
    baseline, each run's val_loss_gap is its validation loss minus the baseline's on the same
    seed (same initialisation seed, same data order): a paired difference, so what a seed does
    to both runs cancels out of the spread."""
    per_seed = {variant: [dict(row) for row in rows] for variant, rows in per_seed.items()}
    if baseline is not None:
        base = [row["val_loss"] for row in per_seed[baseline]]
        for variant, rows in per_seed.items():
            if variant != baseline:
                for row, base_loss in zip(rows, base, strict=True):
                    row["val_loss_gap"] = (None if None in (row["val_loss"], base_loss)
                                           else row["val_loss"] - base_loss)
    results = {}
    for variant, rows in per_seed.items():
        keys = list(dict.fromkeys(key for row in rows for key in row))
        values = {key: [row.get(key) for row in rows] for key in keys}
        results[variant] = {"per_seed": values,
                            "summary": {key: aggregate(v) for key, v in values.items()}}
    return results


# ---- the report ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    key: str
    header: str
    digits: int
    signed: bool = False


def columns(baseline: str | None) -> list[Column]:
    return [
        Column("val_loss", "val loss", 3),
        Column("val_nats_per_byte", "val nats/byte", 4),
        Column("val_loss_gap", f"val loss − {baseline}", 3, signed=True),
        Column("train_loss", "train loss", 3),
        Column("max_violation_mean", "MaxVio mean", 3),
        Column("max_violation_end", "MaxVio end", 3),
        Column("val_max_violation_end", "MaxVio global (validation) end", 3),
        Column("steps_to_balance", f"steps to MaxVio < {BALANCED_MAX_VIOLATION}", 0),
        Column(DEAD_AT_KEY, f"dead experts @{DEAD_AT_STEP}", 1),
        Column("dead_experts_end", "dead experts end", 1),
        Column("tokens_per_s", "tokens/s", 0),
    ]


def format_cell(column: Column, stats: dict | None, seeds: int) -> str:
    if stats is None:
        return "-"
    if stats["n"] == 0:
        return "never" if column.key == "steps_to_balance" else "-"
    sign = "+" if column.signed else ""
    cell = f"{stats['mean']:{sign}.{column.digits}f}".replace("-", "−")
    if stats["std"] is not None:
        cell += f" ± {stats['std']:.{column.digits}f}"
    if stats["n"] < seeds:
        cell += f" ({stats['n']} of {seeds} seeds)"
    return cell


def results_table(results: dict, baseline: str | None, seeds: int) -> str:
    shown = [c for c in columns(baseline)
             if any(c.key in r["summary"] for r in results.values())]
    lines = ["| variant | parameters (total / active) | "
             + " | ".join(c.header for c in shown) + " |",
             "|---" * (len(shown) + 2) + "|"]
    for variant, result in results.items():
        summary = result["summary"]
        params = (f"{summary['params_total']['mean'] / 1e6:.2f}M / "
                  f"{summary['params_active']['mean'] / 1e6:.2f}M"
                  if "params_total" in summary else "-")
        lines.append(f"| {variant} | {params} | "
                     + " | ".join(format_cell(c, summary.get(c.key), seeds) for c in shown)
                     + " |")
    return "\n".join(lines)


def write_markdown(out: Path, experiment: str, results: dict, seeds: list[int],
                   overrides: list[str], setup: dict, wall_s: float | None,
                   pictures: list[str]) -> str:
    spec = EXPERIMENTS[experiment]
    runs = (f"{setup['steps']} steps x {setup['tokens_per_step']:,} tokens = "
            f"{setup['tokens']:,} tokens per run")
    lines = [
        f"# {experiment}", "", spec.question, "",
        f"{len(seeds)} seed{'s' * (len(seeds) > 1)} ({', '.join(map(str, seeds))}), "
        "mean ± sample std over seeds; "
        f"{runs}; data={setup['data']}, tokenizer {setup['tokenizer']} (validation loss in "
        "nats/token, and in nats per byte of the text, at the last validation)."
        + (f" Overrides: `{' '.join(overrides)}`." if overrides else "")
        + ("" if wall_s is None else f" Wall time: {wall_s / 60:.1f} min."), "",
        results_table(results, spec.baseline, len(seeds)), "",
        (f"val loss − {spec.baseline}: each seed's difference from {spec.baseline} on the "
         "same seed, then mean ± std. " if spec.baseline else "")
        + (f"MaxVio (global batch, max load / mean load − 1): \"mean\" over the logged steps "
           f"of the layers' mean; \"end\" and \"steps to MaxVio < {BALANCED_MAX_VIOLATION}\" "
           "(the first logged step from which it stays below, to the end) on the worst layer. "
           "MaxVio global (validation): the paper's MaxVio_global, on the loads summed over "
           "the whole last validation pass, layers' mean. "
           "Dead experts: experts with no token in the step, summed over layers. Train loss: "
           f"cross-entropy, mean of the last {TRAIN_LOSS_WINDOW} logged steps. tokens/s: with "
           "the other runs of the experiment sharing the machine. Per-seed values: "
           "results.json."),
        "", *[f"![{Path(p).stem}]({p})" for p in pictures], ""]
    text = "\n".join(lines)
    (out / "results.md").write_text(text)
    return text


# ---- the pictures ----------------------------------------------------------------------------

def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def seed_curves(runs: dict[int, Path], value) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values (seeds, steps)) of `value(record)` (None: no point) at the steps every
    seed logged."""
    per_seed = []
    for run_dir in runs.values():
        points = {r["step"]: value(r) for r in read_records(run_dir)}
        per_seed.append({s: v for s, v in points.items() if v is not None})
    steps = sorted(set.intersection(*(set(p) for p in per_seed)))
    return np.array(steps), np.array([[p[s] for s in steps] for p in per_seed], dtype=float)


def _band(ax, steps, values, color, label, floor=None):
    mean = values.mean(0)
    std = values.std(0, ddof=1) if len(values) > 1 else np.zeros_like(mean)
    ax.plot(steps, mean, color=color, lw=1.5, label=label)
    low = mean - std if floor is None else np.maximum(mean - std, floor)
    ax.fill_between(steps, low, mean + std, color=color, alpha=0.2, lw=0)


def comparison_figure(experiment: str, runs: dict[str, dict[int, Path]],
                      baseline: str | None) -> Figure:
    """Validation loss, its gap to the baseline (paired by seed) and the worst layer's MaxVio
    over steps: mean over seeds, band ± one sample std."""
    colors = {v: colormaps["tab10"](i) for i, v in enumerate(runs)}
    val = {v: seed_curves(r, lambda rec: rec.get("val_loss")) for v, r in runs.items()}
    worst = {v: seed_curves(r, lambda rec: max(rec["moe"]["max_violation_global"])
                            if "moe" in rec else None) for v, r in runs.items()}
    worst = {v: c for v, c in worst.items() if c[0].size}
    val_worst = {v: seed_curves(r, lambda rec: max(rec["val_moe"]["max_violation"])
                                if "val_moe" in rec else None) for v, r in runs.items()}
    panels = 1 + (baseline is not None) + bool(worst)
    fig = _new_figure(4.6 * panels + 1.6, 4.2)
    axes = list(fig.subplots(1, panels))
    ax = axes.pop(0)
    for variant, (steps, values) in val.items():
        _band(ax, steps, values, colors[variant], variant)
    ax.set(xlabel="step", ylabel="validation loss (nats/token)", title="validation loss")
    if baseline is not None:
        ax = axes.pop(0)
        base_steps, base = val[baseline]
        for variant, (steps, values) in val.items():
            if variant != baseline:
                common = np.intersect1d(steps, base_steps)
                gap = values[:, np.isin(steps, common)] - base[:, np.isin(base_steps, common)]
                _band(ax, common, gap, colors[variant], variant)
        ax.axhline(0, color=colors[baseline], ls="--", lw=1)
        ax.set(xlabel="step", ylabel=f"validation loss − {baseline}'s (same seed)",
               title=f"gap to {baseline} (below 0: better)")
    if worst:
        ax = axes.pop(0)
        for variant, (steps, values) in worst.items():
            _band(ax, steps, values, colors[variant], variant, floor=1e-3)
            val_steps, val_values = val_worst[variant]
            if val_steps.size:  # the paper's MaxVio_global: a whole validation pass's loads
                ax.plot(val_steps, val_values.mean(0), "o", color=colors[variant], ms=4,
                        mec="black", mew=0.5)
        ax.axhline(BALANCED_MAX_VIOLATION, color="grey", ls=":", lw=1)
        ax.set_yscale("log")
        # down to half the lowest mean: a band whose mean - std nears 0 would otherwise stretch
        # the log axis over decades that no curve uses (it runs off the bottom instead)
        lowest = min(values.mean(0).min() for _, values in worst.values())
        ax.set_ylim(bottom=max(lowest / 2, 1e-3))
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5), numticks=12))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel="step", ylabel="MaxVio, worst MoE layer (global batch)",
               title=f"load balance (dotted: {BALANCED_MAX_VIOLATION}; "
                     "dots: validation set)")
    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, which="major")
    seeds = len(next(iter(runs.values())))
    fig.suptitle(f"{experiment}: mean over {seeds} seeds, band ± 1 std")
    handles = [h for h in fig.axes[0].get_legend_handles_labels()[0]]
    fig.legend(handles=handles, loc="outside right upper")
    return fig


def heatmaps_figure(runs: dict[str, Path], seed: int) -> Figure | None:
    """Per-expert load / fair share over steps of each MoE variant's middle MoE layer, side by
    side on one colour scale (the same colour is the same load in every panel)."""
    panels = {}
    for variant, run_dir in runs.items():
        metrics = read_metrics(run_dir)
        if metrics.moe_records:
            layers = metrics.moe_records[0]["moe"]["layers"]
            index = len(layers) // 2
            steps = np.array([r["step"] for r in metrics.moe_records])
            panels[variant] = (layers[index], steps, metrics.load_ratios[:, index, :].T)
    if not panels:
        return None
    all_ratios = np.concatenate([ratios.ravel() for _, _, ratios in panels.values()])
    norm, cmap = load_norm(all_ratios), load_cmap()
    fig = _new_figure(min(18.0, 1.5 + 3.8 * len(panels)), 4.4)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (variant, (layer, steps, ratios)) in zip(axes, panels.items(), strict=True):
        mesh = ax.pcolormesh(_cell_edges(steps), np.arange(ratios.shape[0] + 1) - 0.5,
                             np.ma.masked_less_equal(ratios, 0), cmap=cmap, norm=norm,
                             rasterized=True)
        ax.set(title=f"{variant} (layer {layer})", xlabel="step", ylabel="expert")
        ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(8, integer=True))
    _add_load_colorbar(fig, list(axes), mesh, all_ratios)
    fig.suptitle(f"expert load / fair share, middle MoE layer, seed {seed}")
    return fig


# ---- the command ---------------------------------------------------------------------------

def run_setup(run_dir: Path, summary: dict) -> dict:
    from omegaconf import OmegaConf
    cfg = OmegaConf.load(run_dir / "config.yaml")
    return {"steps": summary["steps"], "tokens": summary["tokens"],
            "tokens_per_step": summary["tokens"] // summary["steps"],
            "data": cfg.data.source, "tokenizer": cfg.data.tokenizer}


def report(experiment: str, seeds: list[int], overrides: list[str], out: Path,
           wall_s: float | None = None) -> dict:
    """Summarises OUT's runs into results.json, results.md and the pictures; returns the
    results written to results.json."""
    spec = EXPERIMENTS[experiment]
    runs = {v: {s: out / v / f"seed{s}" for s in seeds} for v in spec.variants}
    per_seed = {v: [summarise(d) for d in r.values()] for v, r in runs.items()}
    results = aggregate_variants(per_seed, spec.baseline)
    setup = run_setup(runs[next(iter(runs))][seeds[0]], per_seed[next(iter(runs))][0])
    pictures = {"comparison.png": comparison_figure(experiment, runs, spec.baseline),
                "heatmaps.png": heatmaps_figure({v: r[seeds[0]] for v, r in runs.items()},
                                                seeds[0])}
    written = []
    for name, fig in pictures.items():
        if fig is not None:
            fig.savefig(out / name, dpi=100)
            written.append(name)
    document = {"experiment": experiment, "question": spec.question, "seeds": seeds,
                "overrides": overrides, "baseline": spec.baseline, "setup": setup,
                "wall_s": wall_s,
                "variants": {v: {"overrides": spec.variants[v],
                                 "runs": {str(s): str(d) for s, d in runs[v].items()},
                                 **results[v]} for v in runs}}
    (out / "results.json").write_text(json.dumps(document, indent=2) + "\n")
    print(write_markdown(out, experiment, results, seeds, overrides, setup, wall_s, written))
    return document


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(options, Hydra overrides): overrides are the key=value arguments, wherever they are
    (so `--seeds 0 1 train.steps=2` works; argparse alone would read them as seeds)."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    return [a for a in argv if a not in overrides], overrides


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Other key=value arguments are Hydra overrides applied to every run.")
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="each sets train.seed and data.seed (default: 0 1 2)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="ranks per run (default 1: single-process runs); "
                             "train.micro_batch_size is per rank, so N ranks see N x the tokens")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs at a time (default: cores // nproc)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: runs/experiments/EXPERIMENT")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the report from OUT's runs, training nothing (pass the "
                             "overrides again to have them listed)")
    options, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(options)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {' '.join(map(str, args.seeds))} repeats a seed")
    if args.nproc < 1 or (args.jobs is not None and args.jobs < 1):
        parser.error(f"--nproc ({args.nproc}) and --jobs ({args.jobs}) must be >= 1")
    jobs = args.jobs or max(1, len(os.sched_getaffinity(0)) // args.nproc)
    out = (args.out or REPO / "runs" / "experiments" / args.experiment).resolve()
    if args.report_only and not out.is_dir():
        parser.error(f"--report-only: {out} holds no runs of {args.experiment} (no such "
                     "directory); pass the --out of the runs")
    wall_s = None
    if not args.report_only:
        out.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        run_jobs(plan_jobs(args.experiment, args.seeds, overrides, out, args.nproc), jobs)
        wall_s = time.monotonic() - began
    return report(args.experiment, args.seeds, overrides, out, wall_s)


if __name__ == "__main__":
    main()
