"""What a layout costs per rank: bytes of parameters, gradients and AdamW state."""

from __future__ import annotations

import math
import os
import resource

from moetrain.config import ParallelConfig
from moetrain.model.transformer import Transformer


def state_bytes_per_rank(model: Transformer, cfg: ParallelConfig, world: int) -> dict[str, int]:
    """Bytes one rank holds for each parameter's shard, its gradient and AdamW's two moments,
    for `cfg` at `world` ranks (the model may be on the meta device; nothing is allocated).

    Routed experts are split over ep by expert; with FSDP dense parameters are split over the
    dp_shard ranks and expert shards over their efsdp replicas (dim 0, rounded up as FSDP
    pads); DDP keeps every dense parameter whole. Activations and FSDP's transient unsharded
    parameters (one block at a time) come on top."""
    fsdp = world > 1 and cfg.data_parallel == "fsdp"
    dp_shard = world // cfg.dp_replicate
    efsdp = dp_shard // cfg.ep
    expert_ids = {id(p) for moe in model.moe_layers() for p in moe.experts.parameters()}
    params = grads = 0
    for p in model.parameters():
        rows, per_row = (p.shape[0], math.prod(p.shape[1:])) if p.ndim else (1, 1)
        if id(p) in expert_ids:
            rows //= cfg.ep
            if fsdp and efsdp > 1:
                rows = math.ceil(rows / efsdp)
        elif fsdp:
            rows = math.ceil(rows / dp_shard)
        size = rows * per_row * p.dtype.itemsize
        params += size
        grads += size if p.requires_grad else 0
    return {"parameters": params, "gradients": grads, "optimizer": 2 * grads}


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"


def resident_bytes() -> int:
    """This process's resident memory now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_resident() -> bool:
    """Start a new high-water mark of resident memory (Linux >= 4.0); False where it cannot, and
    `peak_resident_bytes` then reports the process's lifetime peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_resident_bytes() -> int:
    """The high-water mark of resident memory since `reset_peak_resident` (or process start)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
