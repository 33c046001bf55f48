"""Experts as stacked SwiGLU weights run by one grouped matmul per projection.

Inputs arrive sorted by expert: rows [offset_e, offset_e + tokens_per_expert[e]) belong to expert
e. On CUDA with bf16 this is `torch._grouped_mm` (no host sync). Elsewhere it is `grouped_mm`
below: a custom autograd function whose backward writes each expert's weight gradient straight
into one preallocated (E, out, in) tensor, instead of letting autograd materialise and zero-fill
a full-size gradient for every `weight[e]` it indexed (what makes the HF Mixtral block slow).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _GroupedMM(torch.autograd.Function):
    """out[rows of e] = x[rows of e] @ weight[e].T for stacked weight (E, out, in)."""

    @staticmethod
    def forward(ctx, x, weight, counts: list[int]):
        ctx.save_for_backward(x, weight)
        ctx.counts = counts
        out = x.new_empty(x.shape[0], weight.shape[1])
        start = 0
        for e, n in enumerate(counts):
            if n:
                torch.mm(x[start:start + n], weight[e].t(), out=out[start:start + n])
            start += n
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = x.new_empty(x.shape) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        start = 0
        for e, n in enumerate(ctx.counts):
            rows = slice(start, start + n)
            if grad_x is not None and n:
                torch.mm(grad_out[rows], weight[e], out=grad_x[rows])
            if grad_w is not None:
                if n:
                    torch.mm(grad_out[rows].t(), x[rows], out=grad_w[e])
                else:
                    grad_w[e].zero_()
            start += n
        return grad_x, grad_w, None


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """x (M, in) sorted by expert, weight (E, out, in), counts: rows per expert -> (M, out)."""
    return _GroupedMM.apply(x.contiguous(), weight, counts)


def _use_cuda_grouped_mm(x: torch.Tensor) -> bool:
    low_precision = x.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16)
    return x.is_cuda and low_precision and hasattr(torch, "_grouped_mm")


class GroupedExperts(nn.Module):
    """E SwiGLU experts: down(silu(gate(x)) * up(x)) with weights stacked on dim 0."""

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.num_experts = num_experts
        self.w_gate = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w_up = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w_down = nn.Parameter(torch.empty(num_experts, dim, hidden))

    def init_weights(self, std: float) -> None:
        for w in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(w, std=std)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x (M, D) sorted by expert, tokens_per_expert (E,) int64 -> (M, D)."""
        if _use_cuda_grouped_mm(x):
            return self._forward_cuda(x, tokens_per_expert)
        counts = tokens_per_expert.tolist()  # NOTE: device-to-host sync; free on CPU
        h = F.silu(grouped_mm(x, self.w_gate, counts)) * grouped_mm(x, self.w_up, counts)
        return grouped_mm(h, self.w_down, counts)

    def _forward_cuda(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
        xb = x.bfloat16()

        def mm(inp, w):
            return torch._grouped_mm(inp, w.bfloat16().transpose(-2, -1), offs=offsets)

        h = F.silu(mm(xb, self.w_gate)) * mm(xb, self.w_up)
        return mm(h, self.w_down).type_as(x)


class SwiGLU(nn.Module):
    """A dense SwiGLU FFN: the dense layers, and the always-on shared experts of DeepSeek."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def init_weights(self, std: float) -> None:
        for lin in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(lin.weight, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
