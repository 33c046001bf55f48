"""Where metrics go (rank 0 only): metrics.jsonl always, wandb when enabled, a progress bar.

wandb keys stay bounded however many experts and layers: per-layer scalars, one layer x expert
load heatmap image and one load histogram per layer; never one series per expert.
No secret is ever logged: the API key is read by wandb from the environment, never by us.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import numpy as np

from moetrain.config import LoggerConfig

LAYER_SCALARS = ("max_violation_global", "max_violation_micro", "load_entropy", "dead_experts",
                 "dropped_fraction", "aux_loss", "z_loss", "router_entropy", "bias_mean",
                 "bias_std", "bias_min", "bias_max")


def resolve_wandb_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class RunLogger:
    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict, name: str,
                 total_steps: int, start_step: int = 0, resumed_from: Path | None = None):
        self.run_dir, self.make_plots = run_dir, cfg.plots
        # also a resume=auto that found no checkpoint, and starts again from step 0
        supersede_records_after(run_dir / "metrics.jsonl", start_step)
        self.metrics = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self.wandb = None
        self.mode = resolve_wandb_mode(cfg.wandb.mode)
        if self.mode != "disabled":
            import wandb
            # One wandb run per run dir: a resumed run continues the same dashboard.
            id_file = run_dir / "wandb_run_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            self.wandb = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity,
                                    name=name, mode=self.mode, dir=str(run_dir), id=run_id,
                                    config=config, resume="allow")
        self.bar = None
        if cfg.progress_bar:
            from tqdm import tqdm
            # `initial`: a resumed run's rates count only the steps this process ran.
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train",
                            file=sys.stderr, dynamic_ncols=True)
        if resumed_from is not None:
            self.write(f"resumed from {resumed_from} at step {start_step}", file=sys.stdout)
            self.event({"event": "resume", "step": start_step, "checkpoint": str(resumed_from)})

    def log(self, record: dict) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(wandb_payload(record), step=record["step"])

    def progress(self, step: int, loss: float, tokens_per_s: float, worst_max_violation):
        """The figures shown beside the bar (each log step)."""
        if self.bar is None:
            return
        postfix = {"loss": f"{loss:.3f}", "tok/s": f"{tokens_per_s:,.0f}"}
        if worst_max_violation is not None:
            postfix["maxvio"] = f"{worst_max_violation:.2f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.advance(step)

    def advance(self, step: int) -> None:
        """Every step; tqdm redraws at most every mininterval."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def write(self, line: str, file=None) -> None:
        """A line for the console (stderr unless `file`) that does not break the bar."""
        file = file or sys.stderr
        if self.bar is not None:
            self.bar.write(line, file=file)
        else:
            print(line, file=file, flush=True)

    def event(self, record: dict) -> None:
        self.metrics.write(json.dumps(record) + "\n")

    def alert(self, event: dict) -> None:
        """A collapse event {"step", "layer", "kind", "message"}: console, metrics, wandb."""
        self.write(f"WARNING: {event['message']} (step {event['step']})")
        self.event({"event": "collapse", **event})
        if self.wandb is not None:  # the summary also reaches an offline run, once synced
            self.wandb.summary[f"collapse/layer{event['layer']}/{event['kind']}"] = event["step"]
        if self.wandb is not None and self.mode == "online":
            self.wandb.alert(title="moetrain: expert collapse", text=event["message"])

    def close(self) -> None:
        """Ends the bar, wandb and metrics.jsonl; then (logger.plots) writes RUN_DIR/plots."""
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.metrics.close()
        if not self.make_plots:
            return
        from moetrain.plots import write_plots
        try:
            written = write_plots(self.run_dir)
        except Exception as error:  # never mask how the run ended
            print(f"WARNING: plots not written: {type(error).__name__}: {error}",
                  file=sys.stderr, flush=True)
            return
        if written:
            count = f"{len(written)} file{'s' if len(written) > 1 else ''}"
            print(f"plots: {written[0].parent}/ ({count})", flush=True)


def supersede_records_after(path: Path, step: int) -> None:
    """A resumed run logs again the steps after its checkpoint (all of them when it found
    none to start from): move the old records of those steps to metrics.superseded.jsonl
    (kept, never lost) so metrics.jsonl holds one record per step. The superseded file is
    written first; metrics.jsonl is replaced atomically."""
    if not path.is_file():
        return
    keep, later = [], []
    for line in path.read_text().splitlines(keepends=True):
        try:
            record_step = json.loads(line).get("step")
        except ValueError:  # a line cut by a crash mid-write
            later.append(line if line.endswith("\n") else line + "\n")
            continue
        (later if isinstance(record_step, int) and record_step > step else keep).append(line)
    if not later:
        return
    with open(path.with_name("metrics.superseded.jsonl"), "a") as f:
        f.writelines(later)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def wandb_payload(record: dict) -> dict:
    """A metrics record as wandb keys: scalars, per-layer MoE scalars, one labelled
    layer x expert heatmap and a load histogram per layer."""
    import wandb

    from moetrain.plots import figure_to_rgb, load_heatmap_figure
    payload = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
    for phase, ms in record.get("phase_ms", {}).items():
        payload[f"phase_ms/{phase}"] = ms
    moe = record.get("moe")
    if moe:
        for key in LAYER_SCALARS:
            for layer, value in zip(moe["layers"], moe.get(key, [])):
                payload[f"moe/{key}/layer{layer}"] = value
        load = np.asarray(moe["load_fraction"])  # (L, E)
        figure = load_heatmap_figure(load, moe["layers"], step=record.get("step"))
        payload["moe/load_heatmap"] = wandb.Image(
            figure_to_rgb(figure), caption="load / fair share: MoE layers x experts")
        for layer, row in zip(moe["layers"], load):
            payload[f"moe/load_hist/layer{layer}"] = wandb.Histogram(row)
    val_moe = record.get("val_moe")
    if val_moe:  # over the whole validation pass: the paper's MaxVio_global
        for layer, value in zip(val_moe["layers"], val_moe["max_violation"]):
            payload[f"val/max_violation/layer{layer}"] = value
    return payload
