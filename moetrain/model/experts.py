"""Experts as stacked SwiGLU weights, run grouped over tokens sorted by expert.

Inputs arrive sorted by expert: rows [offset_e, offset_e + tokens_per_expert[e]) belong to expert
e, each row with its gate weight. Outputs come back already multiplied by the gate weight, so
the combine step is a pure un-permute and sum.

On CUDA with bf16 the projections are `torch._grouped_mm` calls (no host sync). Elsewhere the
whole expert FFN runs in `_SwiGLUExpertsCPU`, an autograd function that walks the experts once:
each expert's rows stay in cache from the gate/up matmuls through SwiGLU, the down matmul and the
gate scaling, and its backward writes each expert's weight gradient straight into one
preallocated (E, out, in) tensor. Autograd over `weight[e]` indexing would instead allocate and
zero-fill a full-size stacked gradient per expert (what makes the HF Mixtral block slow).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor


class _SwiGLUExpertsCPU(torch.autograd.Function):
    """out[rows of e] = g * (silu(x W_gate[e]^T) * (x W_up[e]^T)) W_down[e]^T."""

    @staticmethod
    def forward(ctx, x, gates, w_gate, w_up, w_down, counts: list[int]):
        M, hidden = x.shape[0], w_gate.shape[1]
        out = x.new_empty(M, w_down.shape[1])
        gate_proj = x.new_empty(M, hidden)  # saved pre-activations, as autograd would keep
        up_proj = x.new_empty(M, hidden)
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = slice(start, start + n)
                torch.mm(x[rows], w_gate[e].t(), out=gate_proj[rows])
                torch.mm(x[rows], w_up[e].t(), out=up_proj[rows])
                h = F.silu(gate_proj[rows]).mul_(up_proj[rows])
                torch.mm(h, w_down[e].t(), out=out[rows]).mul_(gates[rows, None])
            start += n
        ctx.save_for_backward(x, gates, w_gate, w_up, w_down, gate_proj, up_proj)
        ctx.counts = counts
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, gates, w_gate, w_up, w_down, gate_proj, up_proj = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = torch.empty_like(x)
        grad_gates = torch.empty_like(gates)
        grads_w = [torch.empty_like(w) for w in (w_gate, w_up, w_down)]
        grad_w_gate, grad_w_up, grad_w_down = grads_w
        start = 0
        for e, n in enumerate(ctx.counts):
            if not n:
                for grad_w in grads_w:
                    grad_w[e].zero_()
                continue
            rows = slice(start, start + n)
            start += n
            x_e, dy, g = x[rows], grad_out[rows], gates[rows, None]
            a, b = gate_proj[rows], up_proj[rows]  # (n, hidden)
            sig = torch.sigmoid(a)
            silu_a = a * sig
            h = silu_a * b
            dh = torch.mm(dy, w_down[e])  # d(loss)/d(h) before the gate scaling
            grad_gates[rows] = (dh * h).sum(-1)
            torch.mm(dy.t(), h.mul_(g), out=grad_w_down[e])
            dh.mul_(g)
            da = dh * b * sig * (1 + a * (1 - sig))  # silu'(a) = sig * (1 + a * (1 - sig))
            db = dh.mul_(silu_a)
            torch.mm(da.t(), x_e, out=grad_w_gate[e])
            torch.mm(db.t(), x_e, out=grad_w_up[e])
            torch.mm(da, w_gate[e], out=grad_x[rows])
            grad_x[rows].addmm_(db, w_up[e])
        return grad_x, grad_gates, grad_w_gate, grad_w_up, grad_w_down, None


def _use_cuda_grouped_mm(x: torch.Tensor) -> bool:
    low_precision = x.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16)
    return x.is_cuda and low_precision and hasattr(torch, "_grouped_mm")


class GroupedExperts(nn.Module):
    """E SwiGLU experts: down(silu(gate(x)) * up(x)) with weights stacked on dim 0."""

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w_up = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w_down = nn.Parameter(torch.empty(num_experts, dim, hidden))

    def init_weights(self, std: float) -> None:
        for w in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(w, std=std)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor,
                gates: torch.Tensor) -> torch.Tensor:
        """x (M, D) sorted by expert, tokens_per_expert (E_local,) int64, gates (M,) -> (M, D),
        each row scaled by its gate. E_local: the experts held here (all of them in one
        process)."""
        weights = [_local(w) for w in (self.w_gate, self.w_up, self.w_down)]
        # grouped_mm needs 16-byte aligned strides: bf16 dims that are multiples of 8
        if _use_cuda_grouped_mm(x) and all(n % 8 == 0 for w in weights for n in w.shape[1:]):
            return _grouped_mm_experts(x, tokens_per_expert, gates, *weights)
        counts = tokens_per_expert.tolist()  # NOTE: device-to-host sync; free on CPU
        gates = gates.to(x.dtype)
        return _SwiGLUExpertsCPU.apply(x.contiguous(), gates, *weights, counts)


def _local(weight: torch.Tensor) -> torch.Tensor:
    """Expert parallelism hands the experts DTensors sharded on dim 0 (the expert dimension);
    the grouped matmul runs on this rank's block, which the dispatcher's counts describe."""
    return weight.to_local() if isinstance(weight, DTensor) else weight


def _grouped_mm_experts(x, tokens_per_expert, gates, w_gate, w_up, w_down):
    """CUDA, bf16. Offsets are the int32 cumulative counts, so the last group ends at row M
    exactly: no row is left outside a group (rows past the last offset are not written by
    `_grouped_mm` and would carry garbage into the combine and NaN into the gradients)."""
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    xb = x.bfloat16()

    def mm(inp, w):
        return torch._grouped_mm(inp, w.bfloat16().transpose(-2, -1), offs=offsets)

    h = F.silu(mm(xb, w_gate)) * mm(xb, w_up)
    return (mm(h, w_down) * gates.unsqueeze(-1).to(torch.bfloat16)).type_as(x)


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
