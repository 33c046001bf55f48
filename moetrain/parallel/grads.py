"""Gradient accumulation, expert-gradient finalisation and clipping over sharded parameters."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from moetrain.parallel.mesh import ParallelMesh


@contextlib.contextmanager
def accumulating(module: nn.Module, fsdp_defer_sync: bool = False):
    """A micro-batch that is not the step's last. DDP: no all-reduce (no_sync). FSDP: by
    default each micro-batch's gradients are reduce-scattered into the sharded accumulators, so
    memory stays sharded; with `fsdp_defer_sync` the parameters stay unsharded and the
    unsharded gradients accumulate locally until the last micro-batch (no all-gather, reshard
    or reduce-scatter per micro-batch, for the memory of the unsharded model and gradients)."""
    if isinstance(module, FSDPModule) and fsdp_defer_sync:
        module.set_requires_gradient_sync(False)
        module.set_reshard_after_backward(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
            module.set_reshard_after_backward(True)
    elif hasattr(module, "no_sync"):  # DDP
        with module.no_sync():
            yield
    else:
        yield


def finalize_grads(model: nn.Module, mesh: ParallelMesh | None) -> None:
    """Average the expert gradients that no data-parallel wrapper reduces (DTensors over "ep"
    alone: left out of DDP, or of FSDP when each shard group holds one replica) so they equal
    one process's gradient of the global batch. Experts sharded by FSDP arrive that way from its
    reduce-scatter (parallelize sets their divide factor) and are not touched here.

    Each rank's loss is the mean over its own tokens; the global loss is (1/W) sum_r L_r. An
    expert shard's gradient after backward already sums dL_r/dθ over the ranks of its ep group
    (the all-to-all backward brings them home); summing over the edp replicas covers every
    rank, so the divisor is W, not edp. (Dividing by edp is the classic EP bug: expert
    gradients ep times too large.) Call once per optimizer step, after the last backward."""
    if mesh is None or mesh.size() == 1:
        return
    grads = [p.grad.to_local() for p in model.parameters()
             if isinstance(p, DTensor) and p.device_mesh.mesh_dim_names == ("ep",)
             and p.grad is not None]
    if not grads:
        return
    if mesh.edp.size() > 1:  # one collective for all expert gradients
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=mesh.edp.get_group())
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
    torch._foreach_div_(grads, mesh.size())


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip by the norm of the *whole* model's gradient, every shard included; returns it.

    A gradient's squared norm is summed over the mesh dimensions it is sharded on (FSDP's dp
    ranks, the ep ranks, or both) and not over those it is replicated on (HSDP's replicas, the
    edp replicas under DDP); plain tensors are whole on every rank. One all-reduce per kind of
    sharding. Same formula as torch.nn.utils.clip_grad_norm_."""
    squares: dict[tuple, torch.Tensor] = {}  # process groups to sum over -> local sum of g^2
    grads = []
    for p in model.parameters():
        if p.grad is None:
            continue
        grad = p.grad
        groups = ()
        if isinstance(grad, DTensor):
            # Shard, or FSDP's _StridedShard of an ep shard (which is not `is_shard()`)
            groups = tuple(grad.device_mesh.get_group(dim)
                           for dim, placement in enumerate(grad.placements)
                           if not placement.is_replicate())
            grad = grad.to_local()
        grads.append(grad)
        square = grad.to(torch.promote_types(grad.dtype, torch.float32)).pow(2).sum()
        squares[groups] = squares[groups] + square if groups in squares else square
    if not grads:
        return torch.zeros(())
    total = torch.zeros((), device=grads[0].device, dtype=torch.float64)
    for groups, square in squares.items():
        for group in groups:
            dist.all_reduce(square, group=group)
        total = total + square.double()
    total_norm = total.sqrt()  # kinds of sharding summed in fp64
    clip_coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(clip_coef.to(g.dtype))
    return total_norm
