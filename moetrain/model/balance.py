"""Load balancing: pure loss functions, load statistics and the aux-loss-free bias update.

Shapes follow router.py: N tokens, E experts, k experts per token, L MoE layers.
Global statistics never come from here: callers pass a `reduce` (a sum over ranks) that
moetrain.parallel installs; in one process it is the identity.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from moetrain.config import BIAS_UPDATES

Reduce = Callable[[torch.Tensor], torch.Tensor]


def switch_aux_loss(probs: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Switch/GShard: E * sum_i f_i * P_i.

    probs (N, E): router probabilities (differentiable); tokens_per_expert (E,): top-k assignment
    counts before any capacity drop, f_i = count_i / sum(count). Equals 1 at uniform routing."""
    num_experts = probs.shape[-1]
    f = tokens_per_expert.to(probs.dtype) / tokens_per_expert.sum().clamp(min=1)
    P = probs.mean(dim=0)
    return num_experts * torch.sum(f * P)


def sequence_aux_loss(probs: torch.Tensor, topk_ids: torch.Tensor, top_k: int) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss, averaged over sequences (alpha applied by caller).

    probs (B, T, E): normalised scores s'_{t,i}; topk_ids (B, T, k) selected experts.
    f_i = E / (k * T) * count_i, P_i = mean_t s'_{t,i}; loss = mean_b sum_i f_i P_i."""
    B, T, E = probs.shape
    counts = torch.zeros(B, E, device=probs.device, dtype=probs.dtype)
    counts.scatter_add_(1, topk_ids.reshape(B, -1), torch.ones_like(topk_ids.reshape(B, -1),
                                                                  dtype=probs.dtype))
    f = counts * (E / (top_k * T))
    P = probs.mean(dim=1)  # (B, E)
    return torch.sum(f * P, dim=-1).mean()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE: mean over tokens of logsumexp(logits)^2; logits (N, E) in fp32."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def load_metrics(tokens_per_expert: torch.Tensor) -> dict[str, torch.Tensor]:
    """Balance statistics of loads (..., E): works per layer (E,) or stacked (L, E).

    max_violation: max_load / mean_load - 1 (0 when perfectly balanced);
    entropy: load entropy / log(E) in [0, 1]; dead_experts: experts with zero tokens."""
    load = tokens_per_expert.float()
    total = load.sum(dim=-1, keepdim=True).clamp(min=1)
    fraction = load / total
    mean_load = load.mean(dim=-1).clamp(min=1e-9)
    num_experts = load.shape[-1]
    plogp = torch.where(fraction > 0, fraction * fraction.clamp(min=1e-30).log(),
                        torch.zeros_like(fraction))
    # abs: the entropy is >= 0, and a one-expert load would otherwise print as -0.000
    entropy = plogp.sum(dim=-1).abs() / max(math.log(num_experts), 1e-9)
    return {
        "load_fraction": fraction,
        "max_violation": load.max(dim=-1).values / mean_load - 1,
        "entropy": entropy,
        "dead_experts": (load == 0).sum(dim=-1),
    }


@torch.no_grad()
def pop_step_loads(moe_layers: Iterable, reduce: Reduce | None = None) -> torch.Tensor:
    """Tokens per expert of every layer, counted over the whole optimizer step (all
    micro-batches; all ranks when `reduce` sums over them, one collective for all layers).
    Resets the per-step accumulators. Returns (L, E)."""
    layers = list(moe_layers)
    if not layers:
        return torch.empty(0, 0)
    loads = torch.stack([layer.step_tokens_per_expert for layer in layers])
    if reduce is not None:
        loads = reduce(loads)
    for layer in layers:
        layer.step_tokens_per_expert.zero_()
    return loads


def expert_bias_delta(loads: torch.Tensor, rate: float, rule: str) -> torch.Tensor:
    """The aux-loss-free bias step for loads (..., E), a pure function of the loads (summed over
    ranks), so every rank takes the same step. See BalanceConfig.bias_update.

    proportional: rate * (mean - load_i) / mean. The relative error is +1 for a dead expert and
    -(E/k - 1) for one that takes every token, so a collapsed layer moves by up to E/k - 1
    times `rate` per step and a balanced one by a small fraction of it; the steps sum to zero.
    sign: rate * sign(mean - load_i), DeepSeek-V3's fixed step."""
    mean_load = loads.mean(dim=-1, keepdim=True)
    if rule == "proportional":
        # no tokens at all (mean 0): every error is 0, no step
        return rate * (mean_load - loads) / mean_load.clamp(min=1e-9)
    if rule == "sign":
        return rate * torch.sign(mean_load - loads)
    raise ValueError(f"bias update rule {rule!r} is not one of {', '.join(BIAS_UPDATES)}")


@torch.no_grad()
def update_expert_bias(moe_layers: Iterable, loads: torch.Tensor, rate: float,
                       center: bool = False, rule: str | None = None) -> None:
    """DeepSeek-V3 aux-loss-free balancing, once after each optimizer step: each layer's bias
    moves by `expert_bias_delta` of its row of `loads` (L, E) from `pop_step_loads`.
    rule: sign | proportional; None takes each layer's own `balance_cfg.bias_update` (the
    Trainer passes the run's rule explicitly). The bias changes which experts are selected,
    never the gate weights."""
    for layer, layer_loads in zip(moe_layers, loads):
        bias = layer.router.expert_bias
        layer_rule = rule if rule is not None else layer.balance_cfg.bias_update
        bias.add_(expert_bias_delta(layer_loads, rate, layer_rule).to(bias.dtype))
        if center:
            bias.sub_(bias.mean())


SCALAR_STATS = ("dropped_fraction", "aux_loss", "z_loss", "router_entropy")


def moe_layer_stats(moe_layers: Iterable) -> dict[str, torch.Tensor]:
    """Every MoE layer's stats from its last forward, stacked (L, ...) and moved to the host in
    one transfer, so logging costs one device-to-host sync per step, not one per layer."""
    layers = list(moe_layers)
    if not layers or not layers[0].last_stats:
        return {}
    tokens = torch.stack([layer.last_stats["tokens_per_expert"] for layer in layers]).float()
    scalars = torch.stack([torch.stack([layer.last_stats[name].float() for layer in layers])
                           for name in SCALAR_STATS])  # (S, L)
    metrics = load_metrics(tokens)
    L, E = tokens.shape
    packed = torch.cat([tokens.reshape(-1), metrics["load_fraction"].reshape(-1),
                        metrics["max_violation"], metrics["entropy"],
                        metrics["dead_experts"].float(), scalars.reshape(-1)]).cpu()
    tokens, fraction, max_violation, entropy, dead, scalars = packed.split(
        [L * E, L * E, L, L, L, len(SCALAR_STATS) * L])
    stats = {
        "tokens_per_expert": tokens.view(L, E), "load_fraction": fraction.view(L, E),
        "max_violation": max_violation, "entropy": entropy, "dead_experts": dead.long(),
    }
    stats.update(zip(SCALAR_STATS, scalars.view(len(SCALAR_STATS), L)))
    return stats
