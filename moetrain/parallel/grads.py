"""Gradient finalisation and clipping for sharded experts (dense gradients are DDP's job)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from moetrain.model.transformer import Transformer
from moetrain.parallel.parallelize import expert_parameter_names


def finalize_grads(model: Transformer, mesh: DeviceMesh) -> None:
    """Average expert gradients so they equal one process's gradient of the global batch.

    Each rank's loss is the mean over its own tokens and DDP averages dense gradients over all
    W ranks: the global loss is (1/W) sum_r L_r. An expert shard's gradient after backward
    already sums dL_r/dθ over the ranks of its ep group (the all-to-all backward brings them
    home); summing over the edp replicas covers every rank, so the right divisor is W, not edp.
    (Dividing by edp is the classic EP bug: expert gradients ep times too large.)
    Call once per optimizer step, after the last backward."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if world_size == 1:
        return
    grads = [p.grad for p in _expert_params(model) if p.grad is not None]
    if not grads:
        return
    if mesh["edp"].size() > 1:  # one collective for all expert gradients
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=mesh["edp"].get_group())
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
    torch._foreach_div_(grads, world_size)


def clip_grad_norm_(model: Transformer, max_norm: float, mesh: DeviceMesh | None) -> torch.Tensor:
    """Clip by the norm of the *whole* model's gradient, expert shards included.

    Dense gradients are identical on every rank after DDP; expert shards are disjoint across
    the ep group and identical across edp replicas, so their squared norms are summed over ep
    only. Same formula as torch.nn.utils.clip_grad_norm_. Returns the total norm."""
    expert_ids = {id(p) for p in _expert_params(model)}
    dense = [p.grad for p in model.parameters() if p.grad is not None and id(p) not in expert_ids]
    expert = [p.grad for p in model.parameters() if p.grad is not None and id(p) in expert_ids]
    device = next(model.parameters()).device
    dense_sq = sum((g.float().pow(2).sum() for g in dense), torch.zeros((), device=device))
    expert_sq = sum((g.float().pow(2).sum() for g in expert), torch.zeros((), device=device))
    if mesh is not None and mesh["ep"].size() > 1:
        dist.all_reduce(expert_sq, group=mesh["ep"].get_group())
    total_norm = (dense_sq + expert_sq).sqrt()
    clip_coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    for g in dense + expert:
        g.mul_(clip_coef.to(g.dtype))
    return total_norm


def _expert_params(model: Transformer):
    params = dict(model.named_parameters())
    return [params[name] for name in expert_parameter_names(model)]
