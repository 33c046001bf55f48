"""Process groups: backend choice, timeouts, and the device mesh of data and expert parallelism."""

from __future__ import annotations

import os
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ParallelMesh:
    """The meshes of one layout, all views of one set of ranks. `world` is 3-D
    ("dp_replicate", "efsdp", "ep"); ep is the inner (fastest-varying) dimension, so an expert
    group is made of neighbouring ranks (one node on GPUs). The flattened views are kept here
    rather than sliced from `world` again (torch deprecates slicing flattened dims):

      dp        every rank                     dense gradients are averaged over it
      dp_shard  efsdp x ep                     FSDP shards dense parameters over it
      edp       dp_replicate x efsdp           the replicas of one expert shard
      hsdp      (dp_replicate, dp_shard), 2-D  HSDP's mesh for dense parameters, or None
    """

    world: DeviceMesh
    dp: DeviceMesh
    dp_shard: DeviceMesh
    edp: DeviceMesh
    hsdp: DeviceMesh | None

    @property
    def ep(self) -> DeviceMesh:
        return self.world["ep"]

    @property
    def efsdp(self) -> DeviceMesh:
        return self.world["efsdp"]

    @property
    def experts(self) -> DeviceMesh:
        """The mesh FSDP shards expert blocks over: their replicas (2-D under HSDP)."""
        return self.world["dp_replicate", "efsdp"] if self.hsdp is not None else self.efsdp

    def size(self) -> int:
        return self.world.size()


def build_mesh(cfg: ParallelConfig, num_experts: int | None) -> ParallelMesh:
    """Validates the layout before any collective, then creates every group it needs."""
    world_size = dist.get_world_size()
    cfg.validate(world_size, num_experts)
    backend = dist.get_backend()
    options = _group_options(backend, cfg.timeout_s)
    flat = (backend, options) if options else None
    dp_shard = world_size // cfg.dp_replicate
    world = init_device_mesh(
        device_type(), (cfg.dp_replicate, dp_shard // cfg.ep, cfg.ep), mesh_dim_names=MESH_DIMS,
        backend_override={name: flat for name in MESH_DIMS} if flat else None)
    dp = world[MESH_DIMS]._flatten("dp", backend_override=flat)
    hsdp = None
    if cfg.dp_replicate > 1:
        names = ("dp_replicate", "dp_shard")
        hsdp = dp._unflatten(0, (cfg.dp_replicate, dp_shard), names,
                             backend_override={name: flat for name in names} if flat else None)
    return ParallelMesh(world=world, dp=dp,
                        dp_shard=world["efsdp", "ep"]._flatten("dp_shard", backend_override=flat),
                        edp=world["dp_replicate", "efsdp"]._flatten("edp", backend_override=flat),
                        hsdp=hsdp)


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
