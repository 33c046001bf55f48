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
                 total_steps: int):
        self.run_dir = run_dir
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
            self.bar = tqdm(total=total_steps, desc="train", file=sys.stderr,
                            dynamic_ncols=True)

    def log(self, record: dict) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(self._wandb_payload(record), step=record["step"])

    def progress(self, step: int, loss: float, tokens_per_s: float, worst_max_violation):
        if self.bar is None:
            return
        self.bar.n = step
        postfix = {"loss": f"{loss:.3f}", "tok/s": f"{tokens_per_s:,.0f}"}
        if worst_max_violation is not None:
            postfix["maxvio"] = f"{worst_max_violation:.2f}"
        self.bar.set_postfix(postfix, refresh=True)

    def event(self, record: dict) -> None:
        self.metrics.write(json.dumps(record) + "\n")

    def alert(self, message: str) -> None:
        print(f"WARNING: {message}", file=sys.stderr, flush=True)
        self.event({"event": "collapse", "message": message})
        if self.wandb is not None and self.mode == "online":
            self.wandb.alert(title="moetrain: expert collapse", text=message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.metrics.close()

    def _wandb_payload(self, record: dict) -> dict:
        import wandb
        payload = {k: v for k, v in record.items()
                   if isinstance(v, (int, float)) and k != "step"}
        moe = record.get("moe")
        if moe:
            for key in LAYER_SCALARS:
                for layer, value in zip(moe["layers"], moe.get(key, [])):
                    payload[f"moe/{key}/layer{layer}"] = value
            load = np.asarray(moe["load_fraction"])  # (L, E)
            payload["moe/load_heatmap"] = wandb.Image(load_heatmap_pixels(load),
                                                      caption="rows: MoE layers, cols: experts")
            for layer, row in zip(moe["layers"], load):
                payload[f"moe/load_hist/layer{layer}"] = wandb.Histogram(row)
        return payload


def load_heatmap_pixels(load: np.ndarray, cell: int = 8) -> np.ndarray:
    """(L, E) load fractions -> an 8-bit grey image, brighter = more load (fair share = mid)."""
    fair = 1.0 / load.shape[1]
    scaled = np.clip(load / (2 * fair), 0, 1)
    pixels = (255 * scaled).astype(np.uint8)
    return np.kron(pixels, np.ones((cell, cell), dtype=np.uint8))
