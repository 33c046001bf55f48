"""Process groups: backend choice, timeouts, and the (edp, ep) device mesh."""

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
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def build_mesh(cfg: ParallelConfig, num_experts: int | None) -> DeviceMesh:
    """A 2-D mesh ("edp", "ep"): ep is the inner (fastest-varying) dimension so an expert
    group is made of neighbouring ranks (one node on GPUs). Validates before any collective."""
    world_size = dist.get_world_size()
    cfg.validate(world_size, num_experts)
    backend = dist.get_backend()
    options = _group_options(backend, cfg.timeout_s)
    override = {name: (backend, options) for name in ("edp", "ep")} if options else None
    return init_device_mesh(device_type(), (world_size // cfg.ep, cfg.ep),
                            mesh_dim_names=("edp", "ep"), backend_override=override)


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
