"""Every transform of the single-process Transformer, applied in one place and in one order
(torchtitan's `parallelize_*` order):

  1. activation checkpointing   each block recomputed in backward
  2. expert parallelism         stacked expert weights become DTensors sharded on dim 0 (the
                                expert dimension) over "ep"; the all-to-all dispatcher goes in
  3. torch.compile              each block
  4. data parallelism           FSDP2: the experts of each MoE layer over "efsdp" (their
                                replicas), then each block and the root over all ranks; HSDP with
                                dp_replicate > 1. Or DDP, with the expert DTensors left out
                                (wrapped last: a meta model is materialised before it).

Parameter names stay logical (`layers.1.ffn.experts.w_gate`, shape (E, hidden, dim) as a
DTensor), so checkpoints are layout-free. The model is modified in place; the returned module is
what to call for forward/backward (a DDP wrapper, or the model itself).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel

from moetrain.config import ParallelConfig
from moetrain.model.moe import MoE
from moetrain.model.transformer import Transformer
from moetrain.parallel.dispatch import AllToAllDispatcher
from moetrain.parallel.mesh import ParallelMesh


def all_reduce_sum(group):
    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor
    return reduce


def parallelize(model: Transformer, mesh: ParallelMesh | None, cfg: ParallelConfig, *,
                device: torch.device | str = "cpu", seed: int | None = None,
                activation_checkpointing: bool = False, compile: bool = False,
                mixed_precision: bool = False) -> nn.Module:
    """Apply 1-4 above (mesh=None: one process, only 1 and 3).

    A model built on the meta device is materialised on `device` after sharding, and only this
    rank's shards are allocated and initialised (`init_weights(seed)`: the same values as one
    process with that seed); DDP wraps it after that, since it broadcasts at construction. A
    model already materialised keeps its weights. mixed_precision: FSDP computes in bf16 with
    fp32 master weights and fp32 gradient reduction (CUDA)."""
    if activation_checkpointing:
        model.checkpoint_activations()
    if mesh is not None:
        apply_expert_parallel(model.moe_layers(), mesh.ep, cfg.dedup)
        for moe in model.moe_layers():  # global-batch statistics: a sum over every rank
            moe.stats_reduce = all_reduce_sum(mesh.dp.get_group())
    if compile:
        for block in model.layers:
            if block.checkpoint_activations:  # Dynamo cannot trace into the checkpoint call:
                block._forward = torch.compile(block._forward)  # what it runs, compiled
            else:
                block.compile()
    data_parallel = mesh is not None and mesh.size() > 1
    if data_parallel and cfg.data_parallel == "fsdp":
        apply_fsdp(model, mesh, mixed_precision=mixed_precision)
    if model.rope_cos.is_meta:
        model.to_empty(device=device)
        model.init_weights(seed)
    if data_parallel and cfg.data_parallel == "ddp":
        return apply_ddp(model, mesh)
    return model


def apply_expert_parallel(moe_layers: list[MoE], ep_mesh: DeviceMesh, dedup: bool) -> None:
    """Keep this rank's contiguous block of experts as a DTensor Shard(0) over `ep_mesh`
    (global shape (E, ...), local (E / ep, ...)) and install the all-to-all dispatcher, which
    holds the layer's one record of how many experts are local."""
    ep_size, ep_rank = ep_mesh.size(), ep_mesh.get_local_rank()
    if ep_size == 1:
        return
    for moe in moe_layers:
        experts = moe.experts
        local = moe.cfg.num_experts // ep_size
        # every parameter of the experts has the expert on dim 0: weights and LoRA adapters
        for name, full in list(experts.named_parameters(recurse=False)):
            block = full.detach()[ep_rank * local:(ep_rank + 1) * local].clone()
            sharded = DTensor.from_local(block, ep_mesh, [Shard(0)], run_check=False)
            setattr(experts, name, nn.Parameter(sharded, requires_grad=full.requires_grad))
        moe.dispatcher = AllToAllDispatcher(ep_mesh.get_group(), local, dedup)


def apply_fsdp(model: Transformer, mesh: ParallelMesh, mixed_precision: bool) -> None:
    """fully_shard the experts of each MoE layer over their replicas, then each block, then the
    root. Expert gradients are averaged over every rank, not only over their replicas: the
    all-to-all backward already summed the ep group's contributions into each shard.

    With one replica per shard group (efsdp = 1) the experts are not FSDP's: nothing is left to
    shard, and torch 2.13's FSDP divides twice when its reduce-scatter spans one rank on the
    sum path (fp64, or gloo). They stay ep DTensors, averaged by finalize_grads as under DDP."""
    dense_mesh = mesh.hsdp if mesh.hsdp is not None else mesh.dp_shard
    shard_experts = mesh.efsdp.size() > 1
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision else MixedPrecisionPolicy())
    sharded = []
    for block in model.layers:
        ignored = None
        if block.is_moe and shard_experts:
            sharded.append(fully_shard(block.ffn.experts, mesh=mesh.experts, mp_policy=policy))
            block.ffn.experts.set_gradient_divide_factor(mesh.size())
        elif block.is_moe:
            ignored = set(block.ffn.experts.parameters())
        sharded.append(fully_shard(block, mesh=dense_mesh, mp_policy=policy,
                                   ignored_params=ignored))
    sharded.append(fully_shard(model, mesh=dense_mesh, mp_policy=policy))
    if dist.get_backend() == "gloo":  # gloo has no AVG or PREMUL_SUM: SUM, then divide
        for module in sharded:
            module.set_force_sum_reduction_for_comms(True)


def apply_ddp(model: Transformer, mesh: ParallelMesh) -> nn.Module:
    """DDP over all ranks for every parameter except the expert DTensors, whose shards differ
    across ep ranks (finalize_grads averages them over their replicas)."""
    sharded = [name for name, p in model.named_parameters() if isinstance(p, DTensor)]
    if not any(p.requires_grad for p in model.parameters() if not isinstance(p, DTensor)):
        # Only expert parameters train (LoRA on the experts alone): DDP would have nothing
        # to reduce, and refuses a module without a trainable parameter of its own.
        return model
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sharded)
    # broadcast_buffers=False: step_tokens_per_expert is per-rank until pop_step_loads
    # reduces it; expert_bias is kept identical by that same reduction.
    with warnings.catch_warnings():  # torch >= 2.10 deprecates the name, not the behaviour
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return DistributedDataParallel(model, broadcast_buffers=False,
                                       process_group=mesh.dp.get_group())
