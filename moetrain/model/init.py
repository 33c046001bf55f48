"""Layout-free initialisation: a parameter's initial values depend only on (seed, name, index).

Row i (the slice [i] along dim 0) of parameter `name` is drawn from a generator keyed by
(a hash of (seed, name), i). A rank that holds only some rows of a parameter (a DTensor sharded by
expert parallelism and/or FSDP, materialised from the meta device) draws exactly those rows, so
every layout starts from the weights of one process with the same seed, and no rank ever
generates more than one row beyond its own shard. A 1-D parameter is one row.

Rows, not whole tensors: a generator cannot skip ahead by a number of normal draws, so a key
per row is what lets a rank start at its first row. The generator is numpy's PCG64, whose
128-bit state takes the whole key: torch's CPU generator keeps only 32 bits of its seed, so
with (about) 4 billion seeds in all the rows of two parameters whose seeds fall a few apart
would be copies of each other (thousands of rows at DeepSeek-V3's size, for some seeds).
Values are drawn on the CPU in fp32 and copied to the parameter's device and dtype, so they
are the same on every device.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch.distributed.tensor import DTensor
# The public DTensor API has no "which global slice do I hold"; DCP uses this helper for it.
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


def name_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for (seed, name): Python's hash() of a str changes per process."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def local_region(param: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(this rank's tensor, its shape, its offset in the global tensor) for a plain tensor or a
    DTensor of any layout moetrain.parallel makes (expert and FSDP shards hold one block)."""
    if isinstance(param, DTensor):
        local_shape, offset = compute_local_shape_and_global_offset(
            param.shape, param.device_mesh, param.placements)
        return param.to_local(), tuple(local_shape), tuple(offset)
    return param, tuple(param.shape), (0,) * param.ndim


@torch.no_grad()
def seeded_normal_(param: torch.Tensor, std: float, seed: int, name: str) -> None:
    """Fill `param` (or this rank's shard of it) with normal(0, std) values of one process."""
    local, local_shape, offset = local_region(param)
    if local.numel() == 0:
        return
    global_shape = tuple(param.shape)
    base = name_seed(seed, name)
    if len(global_shape) <= 1:  # one row: the whole vector
        values = _draw(base, 0, global_shape, std)
        local.copy_(values[offset[0]:offset[0] + local_shape[0]] if global_shape else values)
        return
    # Row by row into the shard, so the only memory beyond the shard is one row; `columns`
    # are the ones this rank holds of a parameter also sharded on a later dim.
    columns = tuple(slice(o, o + n) for o, n in zip(offset[1:], local_shape[1:]))
    for i in range(local_shape[0]):
        local[i].copy_(_draw(base, offset[0] + i, global_shape[1:], std)[columns])


def _draw(base: int, row: int, shape, std: float) -> torch.Tensor:
    """normal(0, std) values in fp32: row `row` of the parameter keyed `base`."""
    generator = np.random.Generator(np.random.PCG64([base, row]))
    values = np.asarray(generator.standard_normal(shape, dtype=np.float32))
    return torch.from_numpy(values).mul_(std)
