"""Apply expert and data parallelism to an unmodified single-process Transformer, in one place.

Order: (1) shard every MoE layer's stacked expert weights on dim 0 over the "ep" mesh dim and
install the all-to-all dispatcher; (2) install the global-statistics reduce; (3) wrap the model
in DDP over all ranks for the dense parameters, with the expert parameters left out (their
gradients are averaged over the "edp" replicas by `finalize_grads`).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel

from moetrain.config import ParallelConfig
from moetrain.model.moe import MoE
from moetrain.model.transformer import Transformer
from moetrain.parallel.dispatch import AllToAllDispatcher

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def expert_parameter_names(model: Transformer) -> list[str]:
    """Names of the stacked routed-expert weights: sharded over ep, replicated over edp."""
    return [name for name, _ in model.named_parameters() if ".experts." in name]


def all_reduce_sum(group):
    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor
    return reduce


def shard_experts(moe_layers: list[MoE], ep_rank: int, ep_size: int) -> None:
    """Keep this rank's contiguous block of experts; names stay logical (layers.N.ffn.experts.*)
    and `expert_offset` records which global experts the block holds."""
    for moe in moe_layers:
        experts = moe.experts
        local = moe.cfg.num_experts // ep_size
        start = ep_rank * local
        for name in EXPERT_WEIGHTS:
            full = getattr(experts, name)
            shard = nn.Parameter(full.detach()[start:start + local].clone(),
                                 requires_grad=full.requires_grad)
            setattr(experts, name, shard)
        experts.num_experts = local
        experts.expert_offset = start


def parallelize(model: Transformer, mesh: DeviceMesh, cfg: ParallelConfig) -> nn.Module:
    """Returns the module to call for forward/backward (DDP-wrapped when world > 1). `model`
    itself is modified in place and stays the handle for optimizers, stats and checkpoints."""
    ep_mesh = mesh["ep"]
    ep_size, ep_rank = ep_mesh.size(), ep_mesh.get_local_rank()
    world_group = dist.group.WORLD
    if ep_size > 1:
        shard_experts(model.moe_layers(), ep_rank, ep_size)
        for moe in model.moe_layers():
            moe.dispatcher = AllToAllDispatcher(ep_mesh.get_group(), dedup=cfg.dedup)
    for moe in model.moe_layers():
        moe.stats_reduce = all_reduce_sum(world_group)
    if dist.get_world_size() == 1:
        return model
    # Expert shards differ across ep ranks: DDP must neither broadcast nor all-reduce them.
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, expert_parameter_names(model))
    # broadcast_buffers=False: step_tokens_per_expert is per-rank until pop_step_loads
    # reduces it; expert_bias is kept identical by that same reduction.
    with warnings.catch_warnings():  # torch >= 2.10 deprecates the name, not the behaviour
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return DistributedDataParallel(model, broadcast_buffers=False)

