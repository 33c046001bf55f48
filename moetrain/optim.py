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


class LocalShardAdamW(torch.optim.AdamW):
    """AdamW that steps DTensor parameters (FSDP, expert parallelism) with torch's fused
    kernel on their local shards. torch's own fused AdamW refuses DTensors ("got mixed
    torch.Tensor and DTensor"), and its per-tensor loop dispatches ~10 DTensor ops per
    parameter: 13 ms a step for half of mixtral_tiny on one CPU thread, against ~1.5 ms
    fused. The state is AdamW's own (step, exp_avg, exp_avg_sq, DTensors like their
    parameters), so checkpoints see no difference; only where the arithmetic runs changes.
    The update is elementwise, so each shard's is the whole tensor's restricted to it, as
    long as parameter, gradient and moments are sharded alike (checked; otherwise AdamW's
    own step runs)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not all(_placements(p.grad) == _placements(p) for p in params):
                super().step()  # sharded unlike its parameter: DTensor arithmetic
                return loss
            groups.append((group, params))
        for group, params in groups:
            if not params:
                continue
            slots = [self._slots(p) for p in params]
            steps = [s["step"] for s in slots]
            torch._foreach_add_(steps, 1)
            beta1, beta2 = group["betas"]
            torch._fused_adamw_(
                [_local(p) for p in params], [_local(p.grad) for p in params],
                [_local(s["exp_avg"]) for s in slots], [_local(s["exp_avg_sq"]) for s in slots],
                [], steps, amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2,
                weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
        return loss

    def _slots(self, param) -> dict:
        state = self.state[param]
        if not state:  # as AdamW's first step makes them (a CPU step count when not fused)
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _placements(t: torch.Tensor):
    return (t.device_mesh, t.placements) if isinstance(t, DTensor) else None


def build_optimizer(model: nn.Module, cfg: OptimConfig, total_steps: int):
    groups = param_groups(model, cfg.weight_decay)
    params = [p for group in groups for p in group["params"]]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    # The fused kernel: one pass over each tensor's parameter, gradient and moments. On the
    # CPU it steps mixtral_tiny's 3.4M parameters in 1.3 ms, against 4.6 ms for the default
    # per-tensor loop and 9 ms for foreach. DTensors on the CPU get it through
    # LocalShardAdamW; on CUDA they keep torch's default (foreach over DTensors).
    if any(isinstance(p, DTensor) for p in params):
        if all(p.device.type == "cpu" for p in params):
            opt = LocalShardAdamW(groups, **kwargs)
        else:
            opt = torch.optim.AdamW(groups, **kwargs)
    else:
        opt = torch.optim.AdamW(groups, **kwargs,
                                fused=all(p.device.type in ("cpu", "cuda") for p in params))

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
