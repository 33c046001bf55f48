"""Instruments that tests and benchmarks attach to a model to see what it does, changing nothing
it computes. `saved_activation_bytes` measures what autograd keeps from forward to backward
(tests/unit/test_activation_checkpointing.py and scripts/bench_recompute.py compare activation
checkpointing with keeping everything); `ForwardCounter` counts forward calls (the same test
and the distributed equivalence gate, tests/distributed/workers.py, check that a checkpointed
block's MoE layers really run again in backward).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def saved_activation_bytes(model: nn.Module, forward: Callable[[], object]) -> int:
    """Bytes of the tensors autograd saves for backward while `forward()` runs. The model's
    parameters are skipped: they are not activations (a checkpointed block keeps only its
    input). Counted as they are saved, so the graph `forward` builds may be dropped at once."""
    params = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if tensor.data_ptr() not in params:
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return total


class ForwardCounter:
    """How many times the given modules ran forward, all together (`calls`). The hooks stay
    for the modules' lifetime; a recomputation in backward counts as a call."""

    def __init__(self, modules: Iterable[nn.Module]):
        self.calls = 0
        for module in modules:
            module.register_forward_hook(self._count)

    def _count(self, module: nn.Module, args, output) -> None:
        self.calls += 1
