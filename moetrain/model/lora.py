"""LoRA (Hu et al. 2021) on the single-process model, with peft's conventions adapted to
stacked experts.

    y = W x + (alpha / r) * B A dropout(x)        A (r, in) random, B (out, r) zero

Adapters are parameters beside the weight they adapt, so every base name is unchanged (a base
checkpoint loads into an adapted model as it is):
    layers.1.attn.wq.lora_A (r, D), layers.1.attn.wq.lora_B (out, r)            nn.Linear
    layers.1.ffn.experts.w_gate_lora_A (E, r, D), ...w_gate_lora_B (E, hidden, r)  stacked
The stacked ones run inside the experts' grouped pass (moetrain.model.experts) and carry the
expert on dim 0, so moetrain.parallel shards them with their experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.config import LoRAConfig
from moetrain.model.experts import GroupedExperts, SwiGLU
from moetrain.model.init import seeded_normal_

ADAPTER_SUFFIXES = ("lora_A", "lora_B")


def is_adapter(name: str) -> bool:
    return name.endswith(ADAPTER_SUFFIXES)


class LoRALinear(nn.Linear):
    """An nn.Linear (same `weight`, so the same state-dict name) with a low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.lora_A = nn.Parameter(base.weight.new_empty(rank, base.in_features))
        self.lora_B = nn.Parameter(base.weight.new_zeros(base.out_features, rank))
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = F.linear(self.dropout(x), self.lora_A.to(x.dtype))  # (..., r)
        return F.linear(x, self.weight, self.bias) + self.scaling * F.linear(
            low, self.lora_B.to(x.dtype))

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding W + scaling * B A (in place in this weight)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta")
        self.weight.add_(self.lora_B @ self.lora_A, alpha=self.scaling)
        linear.weight, linear.bias = self.weight, self.bias
        return linear


def _linear_targets(model, targets: list[str]) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of every nn.Linear the targets name."""
    found = []
    for block in model.layers:
        if "attention" in targets:
            found += [(block.attn, name) for name in ("wq", "wk", "wv", "wo")]
        swiglu = None
        if block.is_moe and "shared_experts" in targets:
            swiglu = block.ffn.shared_experts
        elif not block.is_moe and "dense_ffn" in targets:
            swiglu = block.ffn
        if isinstance(swiglu, SwiGLU):
            found += [(swiglu, name) for name in ("w_gate", "w_up", "w_down")]
    return found


def init_adapter_(param: torch.Tensor, name: str, seed: int) -> None:
    """peft's start: B zero, so the adapted model starts as the base; A random, with the
    variance of peft's kaiming-uniform A, drawn layout-free like every weight."""
    if name.endswith("lora_B"):
        param.zero_()
    else:
        seeded_normal_(param, (3 * param.shape[-1]) ** -0.5, seed, name)


def apply_lora(model, cfg: LoRAConfig, seed: int = 0) -> None:
    """Add adapters to the targets and freeze every other parameter (the router's weight too,
    unless cfg.train_router). Adapters of a materialised model get their initial values here
    (`init_adapter_` with `seed`); on a meta model they are meta too, and
    `Transformer.init_weights` gives them theirs."""
    for parent, name in _linear_targets(model, cfg.targets):
        setattr(parent, name, LoRALinear(getattr(parent, name), cfg.rank, cfg.scaling,
                                         cfg.dropout))
    if "experts" in cfg.targets:
        for moe in model.moe_layers():
            moe.experts.add_lora(cfg.rank, cfg.scaling, cfg.dropout)
    for name, param in model.named_parameters():
        trainable = is_adapter(name) or (cfg.train_router and name.endswith(".router.weight"))
        param.requires_grad_(trainable)
        if is_adapter(name) and not param.is_meta:
            with torch.no_grad():
                init_adapter_(param, name, seed)


@torch.no_grad()
def merge_lora_(model) -> None:
    """Fold every adapter into its weight (W += scaling * B A) and remove it: the model is a
    plain model again, with the LoRA model's function (to float rounding)."""
    for parent, name in [(module, child) for module in model.modules()
                         for child, sub in module.named_children()
                         if isinstance(sub, LoRALinear)]:
        setattr(parent, name, getattr(parent, name).merged())
    for module in model.modules():
        if isinstance(module, GroupedExperts) and module.has_lora:
            module.merge_lora_()


def trainable_state_names(model) -> set[str]:
    """What a LoRA run's checkpoint holds: its trainable parameters (adapters, and the router
    when trained) and every persistent buffer (the aux-free expert bias moves during
    fine-tuning); the frozen base weights come from `init_from`."""
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False)
              if not p.requires_grad}
    return set(model.state_dict()) - frozen
