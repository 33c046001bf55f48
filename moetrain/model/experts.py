"""Experts as stacked SwiGLU weights, run grouped over tokens sorted by expert.

Inputs arrive sorted by expert: rows [offset_e, offset_e + tokens_per_expert[e]) belong to expert
e, each row with its gate weight. Outputs come back already multiplied by the gate weight, so
the combine step is a pure un-permute and sum.

On CUDA with bf16 the projections are `torch._grouped_mm` calls (no host sync). Elsewhere the
whole expert FFN runs in `_SwiGLUExpertsCPU`, an autograd function that walks the experts once,
in blocks of consecutive experts (`walk_blocks`): a block's rows stay in cache from the gate/up
matmuls through SwiGLU, the down matmul and the gate scaling, and its backward writes each
expert's weight gradient straight into one preallocated (E, out, in) tensor. Autograd over
`weight[e]` indexing would instead allocate and zero-fill a full-size stacked gradient per
expert (what makes the HF Mixtral block slow).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor


# How many rows the CPU walk takes at once, as floats of its widest row (max(D, hidden)):
# consecutive experts are grouped into blocks of up to this many, so that small experts share
# one gather, one scatter-add and one call of each elementwise op (a call costs several
# microseconds whatever its size: a third of the time of 32 experts of 64 at dim 128), while a
# block's activations stay in a core's L2 cache (256K floats = 1 MiB; a large expert is a
# block of its own, as before). Only the matmuls remain per expert.
WALK_BLOCK_ELEMENTS = 1 << 18


def walk_blocks(counts: list[int], width: int, budget: int = None
                ) -> list[tuple[slice, list[tuple[int, slice]]]]:
    """Experts with rows, grouped in order into blocks of at most budget // width rows (an
    expert with more rows is a block alone): [(the block's rows, [(expert, its rows within
    the block), ...]), ...]."""
    max_rows = max(1, (WALK_BLOCK_ELEMENTS if budget is None else budget) // width)
    blocks, members, block_start, start = [], [], 0, 0
    for e, n in enumerate(counts):
        if not n:
            continue
        if members and start + n - block_start > max_rows:
            blocks.append((slice(block_start, start), members))
            members, block_start = [], start
        members.append((e, slice(start - block_start, start + n - block_start)))
        start += n
    if members:
        blocks.append((slice(block_start, start), members))
    return blocks


class _SwiGLUExpertsCPU(torch.autograd.Function):
    """out[rows of e] = g * (silu(x W_gate[e]^T) * (x W_up[e]^T)) W_down[e]^T.

    The walk goes over blocks of consecutive experts (`walk_blocks`): per block one gather of
    its rows, the elementwise work and one scatter-add; per expert only its matmuls.

    Rows: with `row_ids` None, x holds the M assignment rows sorted by expert and so does the
    output. With `row_ids` (M,), x is the (N, D) token matrix: each block gathers its rows
    x[row_ids[block]] itself and adds its gate-scaled outputs into an (N, D) output at the
    same rows, so neither the (M, D) permuted copy of x nor the (M, D) expert output is ever
    materialised (nor their gradients in backward); a block's rows stay in cache from the
    gather to the scatter-add.

    With LoRA adapters each projection W[e] y becomes W[e] y + s * B[e] A[e] drop(y), computed
    as two rank-r matmuls in the same walk; base weights that need no gradient (frozen under
    LoRA) get none computed."""

    @staticmethod
    def forward(ctx, x, gates, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down,
                counts: list[int], scaling: float, dropout: float, row_ids):
        M, hidden, D = gates.shape[0], w_gate.shape[1], x.shape[1]
        lora = a_gate is not None
        gathered = row_ids is not None
        out = x.new_zeros(x.shape[0], D) if gathered else x.new_empty(M, D)
        gate_proj = x.new_empty(M, hidden)  # saved pre-activations, as autograd would keep
        up_proj = x.new_empty(M, hidden)
        if lora:  # (M, r) adapter activations A drop(y), and the dropout masks (already / (1-p))
            rank = a_gate.shape[1]
            low = [x.new_empty(M, rank) for _ in range(3)]  # gate, up, down
            masks = ([_dropout_mask(x, (M, D), dropout), _dropout_mask(x, (M, D), dropout),
                      _dropout_mask(x, (M, hidden), dropout)] if dropout > 0 else [None] * 3)
        blocks = walk_blocks(counts, max(D, hidden))
        for block, experts in blocks:
            ids = row_ids[block] if gathered else None
            x_b = x.index_select(0, ids) if gathered else x[block]
            a_b, b_b = gate_proj[block], up_proj[block]
            for e, rows in experts:
                torch.mm(x_b[rows], w_gate[e].t(), out=a_b[rows])
                torch.mm(x_b[rows], w_up[e].t(), out=b_b[rows])
                if lora:
                    _add_adapter(a_b[rows], x_b[rows], a_gate[e], b_gate[e], scaling,
                                 low[0][block][rows], _rows(masks[0], block, rows))
                    _add_adapter(b_b[rows], x_b[rows], a_up[e], b_up[e], scaling,
                                 low[1][block][rows], _rows(masks[1], block, rows))
            h = F.silu(a_b).mul_(b_b)
            y_b = x.new_empty(a_b.shape[0], D) if gathered else out[block]
            for e, rows in experts:
                torch.mm(h[rows], w_down[e].t(), out=y_b[rows])
                if lora:
                    _add_adapter(y_b[rows], h[rows], a_down[e], b_down[e], scaling,
                                 low[2][block][rows], _rows(masks[2], block, rows))
            y_b.mul_(gates[block, None])
            if gathered:
                out.index_add_(0, ids, y_b)
        saved = [x, gates, w_gate, w_up, w_down, gate_proj, up_proj]
        if lora:
            saved += [a_gate, b_gate, a_up, b_up, a_down, b_down, *low]
            ctx.masks = masks
        if gathered:
            saved.append(row_ids)
        ctx.save_for_backward(*saved)
        ctx.counts, ctx.blocks, ctx.lora, ctx.scaling, ctx.gathered = (
            counts, blocks, lora, scaling, gathered)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        x, gates, w_gate, w_up, w_down, gate_proj, up_proj = saved[:7]
        row_ids = saved[-1] if ctx.gathered else None
        need = ctx.needs_input_grad
        grad_out = grad_out.contiguous()
        grad_x = torch.zeros_like(x) if ctx.gathered else torch.empty_like(x)
        grad_gates = torch.empty_like(gates)
        # None for a base weight that needs no gradient (frozen under LoRA): nothing computed
        grad_w_gate, grad_w_up, grad_w_down = (
            torch.empty_like(w) if need[i] else None for i, w in ((2, w_gate), (3, w_up),
                                                                  (4, w_down)))
        lora_grads = [None] * 6
        if ctx.lora:
            adapters, low, masks, s = saved[7:13], saved[13:16], ctx.masks, ctx.scaling
            a_gate, b_gate, a_up, b_up, a_down, b_down = adapters
            lora_grads = [torch.empty_like(t) for t in adapters]
            ga_gate, gb_gate, ga_up, gb_up, ga_down, gb_down = lora_grads
        for e, n in enumerate(ctx.counts):  # experts that saw no token: exact zeros
            if not n:
                for grad in (grad_w_gate, grad_w_up, grad_w_down, *lora_grads):
                    if grad is not None:
                        grad[e].zero_()
        for block, experts in ctx.blocks:
            if ctx.gathered:
                ids = row_ids[block]
                x_b, dy_b = x.index_select(0, ids), grad_out.index_select(0, ids)
            else:
                x_b, dy_b = x[block], grad_out[block]
            g = gates[block, None]
            a, b = gate_proj[block], up_proj[block]  # (n_b, hidden)
            silu_a = F.silu(a)
            h = silu_a * b
            dh = torch.empty_like(a)  # d(loss)/d(h) before the gate scaling
            for e, rows in experts:
                torch.mm(dy_b[rows], w_down[e], out=dh[rows])
            grad_gates[block] = (dh * h).sum(-1)
            if ctx.lora:  # down: y = h W^T + s (drop(h) A^T) B^T, then scaled by the gate
                through_adapter = torch.empty_like(a)
                for e, rows in experts:
                    dy, low_e, g_e = dy_b[rows], low[2][block][rows], g[rows]
                    mask = _rows(masks[2], block, rows)
                    d_low = torch.mm(dy, b_down[e])  # (n, r), before the gate scaling
                    grad_gates[block][rows] += s * (d_low * low_e).sum(-1)
                    torch.mm(dy.t(), low_e * (g_e * s), out=gb_down[e])
                    d_low.mul_(g_e).mul_(s)
                    torch.mm(d_low.t(), h[rows] if mask is None else h[rows] * mask,
                             out=ga_down[e])
                    torch.mm(d_low, a_down[e], out=through_adapter[rows])
                    if mask is not None:
                        through_adapter[rows].mul_(mask)
            if grad_w_down is not None:  # h is not needed after this
                hg = h.mul_(g)
                for e, rows in experts:
                    torch.mm(dy_b[rows].t(), hg[rows], out=grad_w_down[e])
            dh.mul_(g)
            if ctx.lora:
                dh.add_(through_adapter)
            da = torch.ops.aten.silu_backward(dh * b, a)
            db = dh.mul_(silu_a)
            dx_b = x_b.new_empty(x_b.shape) if ctx.gathered else grad_x[block]
            for e, rows in experts:
                x_e = x_b[rows]
                if grad_w_gate is not None:
                    torch.mm(da[rows].t(), x_e, out=grad_w_gate[e])
                if grad_w_up is not None:
                    torch.mm(db[rows].t(), x_e, out=grad_w_up[e])
                dx = torch.mm(da[rows], w_gate[e], out=dx_b[rows])
                dx.addmm_(db[rows], w_up[e])
                if ctx.lora:
                    for d_proj, a_w, b_w, ga, gb, low_p, mask in (
                            (da[rows], a_gate, b_gate, ga_gate, gb_gate, low[0],
                             _rows(masks[0], block, rows)),
                            (db[rows], a_up, b_up, ga_up, gb_up, low[1],
                             _rows(masks[1], block, rows))):
                        # y = x W^T + s (drop(x) A^T) B^T
                        torch.mm(d_proj.t(), low_p[block][rows], out=gb[e]).mul_(s)
                        d_low = torch.mm(d_proj, b_w[e]).mul_(s)  # (n, r)
                        dropped_x = x_e if mask is None else x_e * mask
                        torch.mm(d_low.t(), dropped_x, out=ga[e])
                        if mask is None:
                            dx.addmm_(d_low, a_w[e])
                        else:
                            dx.add_(torch.mm(d_low, a_w[e]).mul_(mask))
            if ctx.gathered:
                grad_x.index_add_(0, ids, dx_b)
        return (grad_x, grad_gates, grad_w_gate, grad_w_up, grad_w_down, *lora_grads,
                None, None, None, None)


def _rows(mask: torch.Tensor | None, block: slice, rows: slice) -> torch.Tensor | None:
    return None if mask is None else mask[block][rows]


def _dropout_mask(like: torch.Tensor, shape: tuple[int, int], p: float) -> torch.Tensor:
    """Inverted dropout: 0, or 1 / (1 - p) with probability 1 - p."""
    return like.new_empty(shape).bernoulli_(1 - p).div_(1 - p)


def _add_adapter(proj, y, a, b, scaling, low_out, mask) -> None:
    """proj += scaling * (drop(y) a^T) b^T, keeping low_out = drop(y) a^T (n, r) for backward;
    mask: y's rows of the dropout mask, or None."""
    dropped = y if mask is None else y * mask
    torch.mm(dropped, a.t(), out=low_out)
    proj.addmm_(low_out, b.t(), alpha=scaling)


def _use_cuda_grouped_mm(x: torch.Tensor) -> bool:
    low_precision = x.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16)
    return x.is_cuda and low_precision and hasattr(torch, "_grouped_mm")


PROJECTIONS = ("w_gate", "w_up", "w_down")


class GroupedExperts(nn.Module):
    """E SwiGLU experts: down(silu(gate(x)) * up(x)) with weights stacked on dim 0.

    `add_lora` gives each projection stacked adapters `<proj>_lora_A` (E, r, in) and
    `<proj>_lora_B` (E, out, r): every parameter here has the expert on dim 0, so expert
    parallelism and FSDP shard the adapters with their experts."""

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w_up = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w_down = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.lora_scaling, self.lora_dropout = 0.0, 0.0
        self.has_lora = False

    def init_weights(self, std: float) -> None:
        for w in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(w, std=std)

    def add_lora(self, rank: int, scaling: float, dropout: float) -> None:
        for name in PROJECTIONS:
            weight = getattr(self, name)
            E, out_features, in_features = weight.shape
            self.register_parameter(f"{name}_lora_A", nn.Parameter(
                weight.new_empty(E, rank, in_features)))
            self.register_parameter(f"{name}_lora_B", nn.Parameter(
                weight.new_zeros(E, out_features, rank)))
        self.lora_scaling, self.lora_dropout, self.has_lora = scaling, dropout, True

    def adapters(self) -> list[torch.Tensor | None]:
        """[A_gate, B_gate, A_up, B_up, A_down, B_down], or six Nones without LoRA."""
        if not self.has_lora:
            return [None] * 6
        return [getattr(self, f"{name}_lora_{ab}") for name in PROJECTIONS for ab in "AB"]

    @torch.no_grad()
    def merge_lora_(self) -> None:
        """W[e] += scaling * B[e] A[e] for every projection; the adapters are removed."""
        for name in PROJECTIONS:
            a, b = getattr(self, f"{name}_lora_A"), getattr(self, f"{name}_lora_B")
            getattr(self, name).add_(torch.bmm(b, a), alpha=self.lora_scaling)
            delattr(self, f"{name}_lora_A")
            delattr(self, f"{name}_lora_B")
        self.has_lora = False

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor, gates: torch.Tensor,
                row_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (M, D) sorted by expert, tokens_per_expert (E_local,) int64, gates (M,) -> (M, D),
        each row scaled by its gate. E_local: the experts held here (all of them in one
        process).

        With row_ids (M,), the token of each assignment sorted by expert: x is the (N, D)
        token matrix and the result (N, D) holds every token's gate-weighted expert outputs
        summed. The same as gathering x[row_ids], the above, then an index_add into token
        order, without the (M, D) copies on the CPU path. (An argument, not a second method:
        FSDP's all-gather of the expert weights runs in the hooks of this module's call.)"""
        return self._run(x, tokens_per_expert, gates, row_ids)

    def _run(self, x, tokens_per_expert, gates, row_ids):
        weights = [_local(w) for w in (self.w_gate, self.w_up, self.w_down)]
        adapters = [None if a is None else _local(a) for a in self.adapters()]
        dropout = self.lora_dropout if self.training else 0.0
        # grouped_mm needs 16-byte aligned strides: bf16 dims that are multiples of 8
        if _use_cuda_grouped_mm(x) and all(n % 8 == 0 for w in weights + adapters
                                           if w is not None for n in w.shape[1:]):
            rows = x if row_ids is None else x.index_select(0, row_ids)
            out = _grouped_mm_experts(rows, tokens_per_expert, gates, *weights, adapters,
                                      self.lora_scaling, dropout)
            return out if row_ids is None else x.new_zeros(x.shape).index_add(0, row_ids, out)
        counts = tokens_per_expert.tolist()  # NOTE: device-to-host sync; free on CPU
        gates = gates.to(x.dtype)
        # Weights that FSDP's mixed precision leaves in fp32 (experts not FSDP-sharded when
        # each shard has one replica) meet bf16 rows: compute in the rows' dtype, as FSDP's
        # param_dtype does for the rest of the block.
        weights = [w.to(x.dtype) for w in weights]
        adapters = [None if a is None else a.to(x.dtype) for a in adapters]
        return _SwiGLUExpertsCPU.apply(x.contiguous(), gates, *weights, *adapters, counts,
                                       self.lora_scaling, dropout, row_ids)


def _local(weight: torch.Tensor) -> torch.Tensor:
    """Expert parallelism hands the experts DTensors sharded on dim 0 (the expert dimension);
    the grouped matmul runs on this rank's block, which the dispatcher's counts describe."""
    return weight.to_local() if isinstance(weight, DTensor) else weight


def _grouped_mm_experts(x, tokens_per_expert, gates, w_gate, w_up, w_down, adapters, scaling,
                        dropout):
    """CUDA, bf16. Offsets are the int32 cumulative counts, so the last group ends at row M
    exactly: no row is left outside a group (rows past the last offset are not written by
    `_grouped_mm` and would carry garbage into the combine and NaN into the gradients).
    Adapters, when present, are two more grouped matmuls per projection, rank r wide."""
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    xb = x.bfloat16()
    a_gate, b_gate, a_up, b_up, a_down, b_down = adapters

    def mm(inp, w):
        return torch._grouped_mm(inp, w.bfloat16().transpose(-2, -1), offs=offsets)

    def project(inp, w, a, b):
        out = mm(inp, w)
        if a is None:
            return out
        return out + scaling * mm(mm(F.dropout(inp, dropout), a), b)

    if a_gate is None:  # gate and up as one matmul: one pass over x, and no sum of two dx
        w_gate_up = torch.cat([w_gate.bfloat16(), w_up.bfloat16()], dim=1)  # (E, 2 hidden, D)
        gate, up = mm(xb, w_gate_up).chunk(2, dim=-1)
    else:
        gate, up = project(xb, w_gate, a_gate, b_gate), project(xb, w_up, a_up, b_up)
    # The gate scales h before the down projection, not its output: the same product (the
    # projection is linear, and dropout acts per element), on (M, hidden) rows instead of
    # (M, D), 4x fewer for fine-grained experts.
    h = F.silu(gate) * up * gates.unsqueeze(-1).to(torch.bfloat16)
    return project(h, w_down, a_down, b_down).type_as(x)


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
