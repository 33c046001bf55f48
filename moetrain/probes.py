"""Instruments that tests and benchmarks attach to a model to see what it does, changing nothing
it computes. `saved_activation_bytes` measures what autograd keeps from forward to backward
(tests/unit/test_activation_checkpointing.py and scripts/bench_recompute.py compare activation
checkpointing with keeping everything); `ForwardCounter` counts forward calls (the same test
and the distributed equivalence gate, tests/distributed/workers.py, check that a checkpointed
block's MoE layers really run again in backward); `residual_report` measures how alike the
tokens are in what each block writes into the residual stream and in the router's input
(scripts/probe_residual.py; the embedding-init tests of tests/unit/test_balance.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def saved_activation_bytes(model: nn.Module, forward: Callable[[], object]) -> int:
    """Bytes of the memory autograd keeps for backward while `forward()` runs: each storage
    behind a saved tensor once (one input saved by three linears, or a view of it, is held
    once), the model's parameters and views of them skipped (they are not activations; a
    checkpointed block keeps only its input). Counted as they are saved, so the graph
    `forward` builds may be dropped at once."""
    # data_ptr -> storage: holding each storage until the end keeps its address from being
    # reused by a later one while this runs
    seen = {p.untyped_storage().data_ptr(): None for p in model.parameters()}
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen[storage.data_ptr()] = storage
            total += storage.nbytes()
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


def common_and_spread(x: torch.Tensor) -> tuple[float, float]:
    """x (N, D) -> (norm of the mean row, mean norm of each row minus the mean row)."""
    mean = x.mean(dim=0)
    return mean.norm().item(), (x - mean).norm(dim=-1).mean().item()


def mean_pairwise_cosine(x: torch.Tensor) -> float:
    """Mean cosine over all ordered pairs of rows of x (N, D), self-pairs included: the
    squared norm of the mean unit row."""
    unit = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    return unit.mean(dim=0).norm().item() ** 2


@torch.no_grad()
def residual_report(model: nn.Module, tokens: torch.Tensor) -> list[dict]:
    """One eval-mode forward of a Transformer on tokens (B, T); per block: `common_and_spread`
    of what attention and the FFN add to the residual stream, and `mean_pairwise_cosine` of
    the FFN's input (the router's input in an MoE block)."""
    captured: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, out):
            out = out[0] if isinstance(out, tuple) else out  # an MoE returns (out, aux)
            captured[name] = out.detach().flatten(0, -2).float()
        return hook

    hooks = []
    for i, block in enumerate(model.layers):
        hooks += [block.attn.register_forward_hook(keep(f"attn{i}")),
                  block.ffn_norm.register_forward_hook(keep(f"ffn_in{i}")),
                  block.ffn.register_forward_hook(keep(f"ffn{i}"))]
    was_training = model.training
    model.eval()
    try:
        model(tokens)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return [{"layer": i, "moe": block.is_moe,
             "attn": common_and_spread(captured[f"attn{i}"]),
             "ffn": common_and_spread(captured[f"ffn{i}"]),
             "ffn_input_cosine": mean_pairwise_cosine(captured[f"ffn_in{i}"])}
            for i, block in enumerate(model.layers)]
