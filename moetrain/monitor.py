"""Expert-load monitoring: the per-layer record every log step, and collapse detection."""

from __future__ import annotations

import torch

from moetrain.config import MonitorConfig
from moetrain.model.balance import load_metrics, moe_layer_stats


def expert_load_record(moe_layers: list, layer_ids: list[int],
                       global_loads: torch.Tensor) -> dict:
    """Per-layer lists, JSON-ready. `global_loads` (L, E): the step's tokens per expert summed
    over micro-batches and ranks; the "micro" figures are this rank's last micro-batch.
    One device-to-host transfer for the micro stats, one for the global ones."""
    micro = moe_layer_stats(moe_layers)
    glob = load_metrics(global_loads)
    biases = [m.router.expert_bias for m in moe_layers if hasattr(m.router, "expert_bias")]
    record = {
        "layers": layer_ids,
        "tokens_per_expert": global_loads.cpu().tolist(),
        "load_fraction": glob["load_fraction"].cpu().tolist(),
        "max_violation_global": glob["max_violation"].cpu().tolist(),
        "max_violation_micro": micro["max_violation"].tolist(),
        "load_entropy": glob["entropy"].cpu().tolist(),
        "dead_experts": glob["dead_experts"].cpu().tolist(),
        "dropped_fraction": micro["dropped_fraction"].tolist(),
        "aux_loss": micro["aux_loss"].tolist(),
        "z_loss": micro["z_loss"].tolist(),
        "router_entropy": micro["router_entropy"].tolist(),
    }
    if len(biases) == len(moe_layers):
        b = torch.stack(biases).float().cpu()
        record.update(bias_mean=b.mean(-1).tolist(), bias_std=b.std(-1).tolist(),
                      bias_min=b.min(-1).values.tolist(), bias_max=b.max(-1).values.tolist())
    return record


class CollapseDetector:
    """Flags a layer when, for `patience` consecutive checks, some expert stays below
    `starve_fraction` of its fair share (1/E) or its normalised load entropy stays below the
    floor (patience on both, so a transient imbalance at initialisation is not a collapse).
    Each starved expert, and each layer's low entropy, is reported once until it recovers: an
    expert that starves in a layer already reported is a new event. Deterministic in the
    loads, so every rank reaches the same decision from the same all-reduced loads."""

    def __init__(self, cfg: MonitorConfig, layer_ids: list[int], num_experts: int):
        self.cfg, self.layer_ids = cfg, layer_ids
        self.starved_for = torch.zeros(len(layer_ids), num_experts, dtype=torch.long)
        self.low_entropy_for = torch.zeros(len(layer_ids), dtype=torch.long)
        self.active: set[tuple[int, str]] = set()

    def update(self, global_loads: torch.Tensor) -> list[dict]:
        """An event {"layer", "kind" (starved | entropy), "message"} per newly detected
        collapse."""
        loads = global_loads.detach().float().cpu()
        E = loads.shape[-1]
        if E < 2:  # one expert takes every token by construction: balanced, never collapsed
            return []
        fraction = loads / loads.sum(-1, keepdim=True).clamp(min=1)
        starved = fraction < self.cfg.starve_fraction / E
        self.starved_for = torch.where(starved, self.starved_for + 1, 0)
        entropy = load_metrics(loads)["entropy"]
        self.low_entropy_for = torch.where(entropy < self.cfg.entropy_floor,
                                           self.low_entropy_for + 1, 0)
        events, now_active = [], set()
        for i, layer in enumerate(self.layer_ids):
            experts = (self.starved_for[i] >= self.cfg.patience).nonzero().flatten().tolist()
            now_active.update((layer, "starved", e) for e in experts)
            new = [e for e in experts if (layer, "starved", e) not in self.active]
            if new:
                events.append({"layer": layer, "kind": "starved", "experts": new,
                               "message": f"expert collapse in layer {layer}: experts {new} "
                               f"below {self.cfg.starve_fraction:.0%} of their fair share for "
                               f"{self.cfg.patience} consecutive checks"})
            if self.low_entropy_for[i] >= self.cfg.patience:
                now_active.add((layer, "entropy"))
                if (layer, "entropy") not in self.active:
                    events.append({"layer": layer, "kind": "entropy",
                                   "message": f"expert collapse in layer {layer}: normalised "
                                   f"load entropy {entropy[i]:.3f} below "
                                   f"{self.cfg.entropy_floor} for {self.cfg.patience} "
                                   "consecutive checks"})
        self.active = now_active
        return events

    def state_dict(self) -> dict:
        return {"starved_for": self.starved_for.clone(),
                "low_entropy_for": self.low_entropy_for.clone(), "active": sorted(self.active)}

    def load_state_dict(self, state: dict) -> None:
        self.starved_for = state["starved_for"].clone()
        self.low_entropy_for = state["low_entropy_for"].clone()
        self.active = {tuple(a) for a in state["active"]}
