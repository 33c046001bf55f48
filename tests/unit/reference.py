"""Naive per-token references written directly from the routing formulas, for the tests only.

Deliberately slow and loop-based: they share no code with moetrain.model beyond reading the
module's parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def topk_python(values: list[float], candidates: list[int], k: int) -> list[int]:
    return sorted(candidates, key=lambda e: -values[e])[:k]


def naive_route_token(logits_t: torch.Tensor, cfg, bias: torch.Tensor | None):
    """One token's routing: list of (expert, gate weight tensor)."""
    E, k = cfg.num_experts, cfg.top_k
    if cfg.router in ("softmax_topk", "top1"):
        exps = [torch.exp(logits_t[e] - logits_t.max()) for e in range(E)]
        total = sum(exps)
        probs = [p / total for p in exps]
        chosen = topk_python([p.item() for p in probs], list(range(E)), k)
        gates = [probs[e] for e in chosen]
        if cfg.router == "softmax_topk" and cfg.norm_topk_prob:
            norm = sum(gates)
            gates = [g / norm for g in gates]
        return [(e, g * cfg.route_scale) for e, g in zip(chosen, gates)]
    assert cfg.router == "sigmoid"
    scores = [1 / (1 + torch.exp(-logits_t[e])) for e in range(E)]
    selection = [scores[e].item() + bias[e].item() for e in range(E)]
    candidates = list(range(E))
    if cfg.n_groups > 1:
        size = E // cfg.n_groups
        group_score = {}
        for g in range(cfg.n_groups):
            members = sorted((selection[e] for e in range(g * size, (g + 1) * size)),
                             reverse=True)
            group_score[g] = members[0] + members[1]
        groups = sorted(group_score, key=lambda g: -group_score[g])[:cfg.topk_groups]
        candidates = [e for g in groups for e in range(g * size, (g + 1) * size)]
    chosen = topk_python(selection, candidates, k)
    gates = [scores[e] for e in chosen]
    if cfg.norm_topk_prob:
        norm = sum(gates)
        gates = [g / norm for g in gates]
    return [(e, g * cfg.route_scale) for e, g in zip(chosen, gates)]


def naive_assignments(moe, x: torch.Tensor):
    """x (N, D) -> list of (token, expert, gate) after routing and capacity, in token order."""
    cfg = moe.cfg
    W = moe.router.weight
    bias = getattr(moe.router, "expert_bias", None)
    N = x.shape[0]
    if cfg.router == "expert_choice":
        factor = 1.0 if cfg.capacity_factor is None else cfg.capacity_factor
        C = min(N, max(1, math.ceil(factor * N * cfg.top_k / cfg.num_experts)))
        probs = [torch.softmax(x[t].float() @ W.float().t(), dim=-1) for t in range(N)]
        out = []
        for e in range(cfg.num_experts):
            ranked = sorted(range(N), key=lambda t: -probs[t][e].item())[:C]
            out += [(t, e, probs[t][e] * cfg.route_scale) for t in ranked]
        return out
    out = []
    for t in range(N):
        logits_t = x[t].float() @ W.float().t()
        out += [(t, e, g) for e, g in naive_route_token(logits_t, cfg, bias)]
    if cfg.capacity_factor is not None:
        capacity = math.ceil(cfg.capacity_factor * N * cfg.top_k / cfg.num_experts)
        kept = []
        for e in range(cfg.num_experts):
            mine = [a for a in out if a[1] == e]
            mine.sort(key=lambda a: -a[2].item())  # stable: ties keep token order
            kept += mine[:capacity]
        out = sorted(kept, key=lambda a: (a[0], a[1]))
    return out


def swiglu(x, w_gate, w_up, w_down):
    return w_down @ (F.silu(w_gate @ x) * (w_up @ x))


def naive_moe(moe, x: torch.Tensor) -> torch.Tensor:
    """out[t] = shared(x[t]) + sum_{i routed for t} g_i * FFN_i(x[t]) with x (N, D)."""
    rows = []
    assignments = naive_assignments(moe, x)
    ex = moe.experts
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        if moe.shared_experts is not None:
            s = moe.shared_experts
            acc = acc + swiglu(x[t], s.w_gate.weight, s.w_up.weight, s.w_down.weight)
        for (tok, e, g) in assignments:
            if tok == t:
                acc = acc + g * swiglu(x[t], ex.w_gate[e], ex.w_up[e], ex.w_down[e])
        rows.append(acc)
    return torch.stack(rows)
