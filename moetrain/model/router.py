"""Routers: token -> (expert, gate weight) assignments.

Shape legend for the whole package: N tokens (batch * seq flattened), D model dim, E experts,
k experts per token, M assignments (N * k for token-choice routers, E * C for expert choice).

Every router returns *flat assignments* (token_ids, expert_ids, weights), each (M,), so that
capacity dropping, the dispatcher and expert choice (a variable number of experts per token) all
share one representation.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.config import MoEConfig


@dataclass
class RouterOutput:
    token_ids: torch.Tensor  # (M,) int64
    expert_ids: torch.Tensor  # (M,) int64
    weights: torch.Tensor  # (M,) fp32 gate weights, differentiable
    logits: torch.Tensor  # (N, E) fp32, for the z-loss
    probs: torch.Tensor  # (N, E) fp32, per-token distribution used by the aux losses
    top_k: int  # assignments per token for token-choice routers (0 for expert choice)


def softmax_topk(logits: torch.Tensor, k: int, normalize: bool):
    """Mixtral: top-k of softmax(logits); optionally renormalise the k weights to sum to 1.

    Returns topk_ids (N, k), topk_weights (N, k), probs (N, E)."""
    probs = logits.softmax(dim=-1)
    topk_weights, topk_ids = probs.topk(k, dim=-1)
    if normalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_ids, topk_weights, probs


def sigmoid_topk(logits: torch.Tensor, expert_bias: torch.Tensor, k: int, n_groups: int,
                 topk_groups: int, normalize: bool, route_scale: float):
    """DeepSeek-V3: select on sigmoid(logits) + bias within the best groups, gate on the unbiased
    sigmoid scores.

    Returns topk_ids (N, k), topk_weights (N, k), normalised scores (N, E) for the aux losses."""
    scores = logits.sigmoid()  # (N, E)
    selection = scores.detach() + expert_bias  # the bias steers selection, never the gradient
    if n_groups > 1:
        N, E = selection.shape
        grouped = selection.view(N, n_groups, E // n_groups)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, n_groups)
        kept_groups = group_scores.topk(topk_groups, dim=-1).indices  # (N, topk_groups)
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool)
        group_mask.scatter_(1, kept_groups, True)
        expert_mask = group_mask.repeat_interleave(E // n_groups, dim=1)  # (N, E)
        selection = selection.masked_fill(~expert_mask, float("-inf"))
    topk_ids = selection.topk(k, dim=-1).indices  # (N, k)
    topk_weights = scores.gather(1, topk_ids)
    if normalize:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    topk_weights = topk_weights * route_scale
    normalized_scores = scores / scores.sum(dim=-1, keepdim=True)
    return topk_ids, topk_weights, normalized_scores


def expert_choice(logits: torch.Tensor, capacity: int):
    """Zhou et al. 2022: each expert takes its `capacity` highest-probability tokens.

    NOTE: a token's experts depend on every other token in the batch, later positions of its own
    sequence included, so this routing is non-causal. It is here for experiments, not for claims
    about autoregressive quality.

    Returns token_ids (E*C,), expert_ids (E*C,) grouped by expert, weights (E*C,), probs (N, E)."""
    probs = logits.softmax(dim=-1)  # (N, E)
    N, E = probs.shape
    capacity = min(capacity, N)
    weights, token_ids = probs.t().topk(capacity, dim=-1)  # (E, C)
    expert_ids = torch.arange(E, device=logits.device).repeat_interleave(capacity)
    return token_ids.reshape(-1), expert_ids, weights.reshape(-1), probs


def expert_choice_capacity(num_tokens: int, cfg: MoEConfig) -> int:
    factor = 1.0 if cfg.capacity_factor is None else cfg.capacity_factor
    return max(1, math.ceil(factor * num_tokens * cfg.top_k / cfg.num_experts))


def _no_autocast(device_type: str):
    """Autocast off on this device (a no-op where there is none, e.g. meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def apply_keeping_fp32(module: nn.Module, fn, recurse: bool, buffers: tuple[str, ...]):
    """`nn.Module._apply` (what `.to`, `.half`, `.cuda`, ... run), except that the named
    buffers, where a cast would put them below fp32, are taken from their values before it,
    moved to the new device in fp32."""
    before = {name: module._buffers[name] for name in buffers
              if module._buffers.get(name) is not None}
    nn.Module._apply(module, fn, recurse)
    for name, old in before.items():
        new = module._buffers[name]
        if new.is_floating_point() and torch.finfo(new.dtype).bits < 32:
            module._buffers[name] = (  # meta (to_empty of a meta-built model): no values yet
                torch.empty(new.shape, device=new.device, dtype=torch.float32)
                if old.is_meta else old.to(device=new.device, dtype=torch.float32))
    return module


class Router(nn.Module):
    """A linear gate (E, D) with fp32 logits; the sigmoid router also holds `expert_bias`."""

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, dim))
        if cfg.router == "sigmoid":
            # A buffer, not a parameter: only the aux-loss-free updater changes it.
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts,
                                                            dtype=torch.float32))
        if cfg.freeze_router:
            self.weight.requires_grad_(False)

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, std=std)
        if hasattr(self, "expert_bias"):
            self.expert_bias.zero_()

    def _apply(self, fn, recurse=True):
        # The bias moves by small steps (1e-3 in DeepSeek-V3) that bf16 would round away, so
        # `.to(torch.bfloat16)` leaves it fp32, as transformers keeps DeepSeek-V3's
        # e_score_correction_bias fp32.
        return apply_keeping_fp32(self, fn, recurse, ("expert_bias",))

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """x: (N, D) -> flat assignments."""
        cfg = self.cfg
        # At least fp32 logits: top-k selection and softmax are sensitive to bf16 rounding.
        # An fp64 model routes in fp64, so two layouts of it can agree to fp64 precision.
        # Autocast (the trainer's one-GPU bf16 path) would run this linear in bf16 whatever
        # its inputs' dtype, so it is off here.
        dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.to(dtype)
        if self.training and cfg.router_jitter > 0:  # drawn in fp32: bf16 has 4 values near 1
            noise = torch.empty_like(x).uniform_(1 - cfg.router_jitter, 1 + cfg.router_jitter)
            x = x * noise
        with _no_autocast(x.device.type):
            logits = F.linear(x, self.weight.to(dtype))  # (N, E)
        N = x.shape[0]
        if cfg.router == "expert_choice":
            capacity = expert_choice_capacity(N, cfg)
            token_ids, expert_ids, weights, probs = expert_choice(logits, capacity)
            if cfg.route_scale != 1.0:
                weights = weights * cfg.route_scale
            return RouterOutput(token_ids, expert_ids, weights, logits, probs, top_k=0)
        if cfg.router == "sigmoid":
            topk_ids, topk_weights, probs = sigmoid_topk(
                logits, self.expert_bias, cfg.top_k, cfg.n_groups, cfg.topk_groups,
                cfg.norm_topk_prob, cfg.route_scale)
        else:  # softmax_topk, or top1 = Switch: the raw probability, never renormalised
            normalize = cfg.norm_topk_prob and cfg.router == "softmax_topk"
            topk_ids, topk_weights, probs = softmax_topk(logits, cfg.top_k, normalize)
            if cfg.route_scale != 1.0:  # as DeepSeek-V2's softmax router scales its gates
                topk_weights = topk_weights * cfg.route_scale
        k = cfg.top_k
        token_ids = torch.arange(N, device=x.device).repeat_interleave(k)  # (N * k,)
        return RouterOutput(token_ids, topk_ids.reshape(-1), topk_weights.reshape(-1), logits,
                            probs, top_k=k)
