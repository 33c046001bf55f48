"""AdamW parameter groups and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from moetrain.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms, biases and embeddings (and anything 1-D) are not decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embeddings" in name or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, total_steps: int):
    groups = param_groups(model, cfg.weight_decay)
    # The fused kernel: one pass over each tensor's parameter, gradient and moments. On the
    # CPU it steps mixtral_tiny's 3.4M parameters in 1.3 ms, against 4.6 ms for the default
    # per-tensor loop and 9 ms for foreach. Not for DTensors (FSDP, expert parallelism): torch
    # 2.13's fused AdamW fails on them ("got mixed torch.Tensor and DTensor").
    fused = all(p.device.type in ("cpu", "cuda") and not isinstance(p, DTensor)
                for group in groups for p in group["params"])
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                            fused=fused)

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
