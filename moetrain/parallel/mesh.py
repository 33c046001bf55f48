"""Process groups: backend choice, timeouts, and the device mesh of data and expert parallelism."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moetrain.config import ParallelConfig


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed(timeout_s: float) -> tuple[int, int]:
    """Join the job started by torchrun (or a test launcher); returns (rank, world_size).

    NCCL when CUDA is available, gloo otherwise. A timeout on every group means a rank that
    dies mid-collective makes the others fail after `timeout_s`, never hang for tens of minutes.
    """
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        timeout = timedelta(seconds=timeout_s)
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restart > 0:
            dist.init_process_group(backend, store=_fresh_store(restart, timeout),
                                    rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def _fresh_store(restart: int, timeout: timedelta) -> dist.Store:
    """The rendezvous store, with keys private to this restart of the job.

    After torchrun restarts failed workers, the restarted ranks can read their peers' addresses
    left in the store by the previous attempt and fail to connect ("Connection refused"; seen
    here with gloo, reported with NCCL in pytorch/pytorch#167288). A per-attempt prefix makes
    every rank wait for the new addresses."""
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    rank = int(os.environ["RANK"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=not agent_store and rank == 0,
                          timeout=timeout, multi_tenant=not agent_store)
    return dist.PrefixStore(f"moetrain/attempt{restart}", store)


MESH_DIMS = ("dp_replicate", "efsdp", "ep")


def build_mesh(cfg: ParallelConfig, num_experts: int | None) -> DeviceMesh:
    """A 3-D mesh ("dp_replicate", "efsdp", "ep") with three flattened views:

      dp        all ranks                      dense gradients are averaged over it
      dp_shard  ("efsdp", "ep")                FSDP shards dense parameters over it
      edp       ("dp_replicate", "efsdp")      the replicas of one expert shard

    ep is the inner (fastest-varying) dimension, so an expert group is made of neighbouring
    ranks (one node on GPUs). Validates before any collective."""
    world_size = dist.get_world_size()
    cfg.validate(world_size, num_experts)
    backend = dist.get_backend()
    options = _group_options(backend, cfg.timeout_s)
    override = {name: (backend, options) for name in MESH_DIMS} if options else None
    dp_shard = world_size // cfg.dp_replicate
    mesh = init_device_mesh(device_type(), (cfg.dp_replicate, dp_shard // cfg.ep, cfg.ep),
                            mesh_dim_names=MESH_DIMS, backend_override=override)
    flat_override = (backend, options) if options else None
    for name, dims in (("dp", MESH_DIMS), ("dp_shard", ("efsdp", "ep")),
                       ("edp", ("dp_replicate", "efsdp"))):
        mesh[dims]._flatten(name, backend_override=flat_override)
    return mesh


def _group_options(backend: str, timeout_s: float):
    """Options carrying our timeout for the mesh's subgroups (they default to 30 minutes)."""
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
    elif backend == "nccl" and hasattr(dist, "ProcessGroupNCCL"):
        options = dist.ProcessGroupNCCL.Options()
    else:
        return None
    options._timeout = timedelta(seconds=timeout_s)
    return options
