"""Tokens per second and model FLOPs utilisation, measured over the steps between two logs."""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from moetrain.config import RunConfig

# Dense bf16 tensor-core peaks (TFLOPS) by device name; train.peak_tflops overrides.
PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """FLOP/s of one device, or None where unknown (CPU): then no MFU is logged."""
    if device.type != "cuda":
        return None
    if override_tflops:
        return override_tflops * 1e12
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_TFLOPS_BF16.items() if k in name), None)


def flops_per_token(cfg: RunConfig, active_params: int) -> float:
    """6 N (forward and backward of the active weights) plus causal attention's 12 L d T."""
    m, T = cfg.model, cfg.data.seq_len
    return 6 * active_params + 12 * m.n_layers * m.dim * T


class Throughput:
    """A window of steps, restarted at each log (and by a new process after a resume)."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak: float | None,
                 world: int):
        self.tokens_per_step, self.flops, self.peak, self.world = (tokens_per_step,
                                                                   flops_per_token, peak, world)
        self.start, self.steps = time.perf_counter(), 0

    def step(self) -> None:
        self.steps += 1

    def read(self) -> dict:
        """tokens/s (and mfu on a known GPU) since the last read; starts a new window."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tokens_per_s = self.tokens_per_step * self.steps / elapsed
        self.start, self.steps = time.perf_counter(), 0
        out = {"tokens_per_s": tokens_per_s}
        if self.peak:
            out["mfu"] = tokens_per_s * self.flops / self.world / self.peak
        return out


class PhaseTimer:
    """Wall time of each phase of the steps (data, forward, backward, ...), summed until read:
    `lap(name)` books the time since the previous lap to `name`. Off by default: on CUDA each
    lap is a device sync, which costs overlap."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled, self.device = enabled, device
        self.totals: dict[str, float] = defaultdict(float)
        self.mark = time.perf_counter()

    def lap(self, phase: str | None) -> None:
        """phase None: start timing here (the beginning of a step) without booking."""
        if not self.enabled:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if phase is not None:
            self.totals[phase] += now - self.mark
        self.mark = now

    def read(self, steps: int) -> dict[str, float]:
        """Milliseconds per step of each phase since the last read; starts a new window."""
        out = {phase: round(1e3 * total / max(steps, 1), 3) for phase, total in
               self.totals.items()}
        self.totals.clear()
        return out
