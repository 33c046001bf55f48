"""The MoE layer: router -> dispatcher -> grouped experts -> combine (+ shared experts).

    out[t] = shared(x[t]) + sum_{i routed for t} g_i * expert_i(x[t])

The layer only knows "a dispatcher". `LocalDispatcher` (one process) is a permutation;
moetrain.parallel swaps in an all-to-all one. Shapes: see the legend in router.py.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from moetrain.config import BalanceConfig, MoEConfig
from moetrain.model import balance
from moetrain.model.experts import GroupedExperts, SwiGLU
from moetrain.model.router import Router, apply_keeping_fp32


@dataclass
class Dispatched:
    """What `dispatch` hands to the experts and, afterwards, to `combine`.

    expert_input (M', D) and gates (M',): the rows this rank's experts process, sorted by local
    expert, tokens_per_expert (E_local,) their counts; token_ids: for each row `combine` gets
    back (after any return exchange), the local token it is added to; num_tokens: N."""

    expert_input: torch.Tensor
    gates: torch.Tensor
    tokens_per_expert: torch.Tensor
    token_ids: torch.Tensor
    num_tokens: int


def count_per_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) int64 assignments per expert. Not `torch.bincount`: on CUDA it reads the largest id
    back to the host (a sync per call)."""
    return expert_ids.new_zeros(num_experts).scatter_add_(0, expert_ids,
                                                          torch.ones_like(expert_ids))


class _SortedRows(torch.autograd.Function):
    """x (N, D) -> x[token_of_sorted] (M = N * k, D): each token's row once per assignment, in
    expert order. Backward sums each token's k row gradients, found through `inverse` (sorted
    position of each token-major assignment): a gather and a sum, where index_select's own
    backward is an atomic index_add (slow in bf16 on CUDA, and non-deterministic)."""

    @staticmethod
    def forward(ctx, x, token_of_sorted, inverse, k: int):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, token_of_sorted)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        grad_x = grad.index_select(0, inverse).view(-1, ctx.k, grad.shape[-1]).sum(1)
        return grad_x, None, None, None


class _TokenSums(torch.autograd.Function):
    """y (M, D) in expert order -> (N, D): each token's k rows summed. The adjoint of
    `_SortedRows`, so each one's backward is the other's forward."""

    @staticmethod
    def forward(ctx, y, token_of_sorted, inverse, k: int):
        ctx.save_for_backward(token_of_sorted)
        return y.index_select(0, inverse).view(-1, k, y.shape[-1]).sum(1)

    @staticmethod
    def backward(ctx, grad):
        (token_of_sorted,) = ctx.saved_tensors
        return grad.index_select(0, token_of_sorted), None, None, None


class LocalDispatcher:
    """One process: sort assignments by expert, and scatter-add expert outputs back to tokens."""

    def __init__(self, num_experts: int):
        self.num_local_experts = num_experts  # one process holds every expert

    def _sorted(self, token_ids, expert_ids, weights):
        """(token of each assignment, gate weights, tokens_per_expert), sorted by expert."""
        order = torch.argsort(expert_ids, stable=True)
        tokens_per_expert = count_per_expert(expert_ids, self.num_local_experts)
        return token_ids[order], weights[order], tokens_per_expert

    def dispatch(self, x, token_ids, expert_ids, weights) -> Dispatched:
        """x (N, D) and M assignments -> the M rows sorted by expert."""
        sorted_token_ids, gates, tokens_per_expert = self._sorted(token_ids, expert_ids, weights)
        # index_select, not x[idx]: its backward is an index_add, far cheaper than index_put.
        return Dispatched(x.index_select(0, sorted_token_ids), gates, tokens_per_expert,
                          sorted_token_ids, x.shape[0])

    def combine(self, expert_output, dispatched: Dispatched):
        """expert_output (M, D), gate-weighted, in dispatch order -> routed output (N, D)."""
        out = expert_output.new_zeros(dispatched.num_tokens, expert_output.shape[-1])
        return out.index_add(0, dispatched.token_ids, expert_output)

    def run(self, experts, x, token_ids, expert_ids, weights, top_k: int = 0):
        """dispatch -> experts -> combine in one: the experts gather their rows of x and add
        their outputs back into token order themselves (GroupedExperts with row_ids).

        top_k > 0 says every token has exactly top_k assignments, token-major (assignment a is
        token a // top_k's). On CUDA the rows then travel by permutation (`_SortedRows`,
        `_TokenSums`): gathers and a sum over k, no atomic scatter-add in either direction."""
        if top_k and x.is_cuda:
            return self.run_permuted(experts, x, token_ids, expert_ids, weights, top_k)
        sorted_token_ids, gates, tokens_per_expert = self._sorted(token_ids, expert_ids, weights)
        return experts(x, tokens_per_expert, gates, row_ids=sorted_token_ids)

    def run_permuted(self, experts, x, token_ids, expert_ids, weights, top_k: int):
        """`run` for exactly top_k assignments per token, token-major, by permutation."""
        order = torch.argsort(expert_ids, stable=True)
        inverse = torch.empty_like(order).scatter_(
            0, order, torch.arange(order.numel(), device=order.device))
        token_of_sorted = token_ids[order]
        rows = _SortedRows.apply(x, token_of_sorted, inverse, top_k)
        y = experts(rows, count_per_expert(expert_ids, self.num_local_experts), weights[order])
        return _TokenSums.apply(y, token_of_sorted, inverse, top_k)


def capacity_keep_mask(expert_ids: torch.Tensor, priority: torch.Tensor, capacity: int,
                       num_experts: int) -> torch.Tensor:
    """(M,) bool: for each expert keep its `capacity` assignments of highest priority (gate
    weight, Megatron's "probs" drop policy); ties go to the earlier token."""
    by_priority = torch.argsort(-priority, stable=True)
    order = by_priority[torch.argsort(expert_ids[by_priority], stable=True)]
    counts = count_per_expert(expert_ids, num_experts)
    starts = torch.cumsum(counts, 0) - counts
    sorted_experts = expert_ids[order]
    position = torch.arange(len(order), device=expert_ids.device) - starts[sorted_experts]
    keep = torch.empty_like(expert_ids, dtype=torch.bool)
    keep[order] = position < capacity
    return keep


class MoE(nn.Module):
    def __init__(self, dim: int, cfg: MoEConfig, balance_cfg: BalanceConfig):
        super().__init__()
        self.cfg = cfg
        self.balance_cfg = balance_cfg
        self.router = Router(dim, cfg)
        self.experts = GroupedExperts(cfg.num_experts, dim, cfg.expert_hidden)
        self.shared_experts = (SwiGLU(dim, cfg.shared_hidden_size)
                               if cfg.n_shared_experts > 0 else None)
        # Holds the layer's one notion of which experts are here: the single-process dispatcher
        # has all of them; expert parallelism installs one that knows this rank's block.
        self.dispatcher = LocalDispatcher(cfg.num_experts)
        # Hook for global-batch statistics: a sum over ranks, installed by moetrain.parallel.
        self.stats_reduce = None
        # Loads summed over the micro-batches of one optimizer step (balance.pop_step_loads):
        # the aux-free bias update and the global-batch load metrics.
        self.register_buffer("step_tokens_per_expert",  # fp32 whatever the default dtype
                             torch.zeros(cfg.num_experts, dtype=torch.float32), persistent=False)
        self.last_stats: dict[str, torch.Tensor] = {}
        # True while activation checkpointing re-runs this forward inside backward: the
        # tokens of that micro-batch were already counted by the first forward.
        self.recomputing = False

    def _apply(self, fn, recurse=True):
        # `.to(torch.bfloat16)` would make the counts inexact above 256 tokens per expert
        return apply_keeping_fp32(self, fn, recurse, ("step_tokens_per_expert",))

    @contextlib.contextmanager
    def recomputation(self):
        self.recomputing = True
        try:
            yield
        finally:
            self.recomputing = False

    def init_weights(self, std: float) -> None:
        self.router.init_weights(std)
        self.experts.init_weights(std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> (out (B, T, D), aux loss scalar already times its coefficients)."""
        B, T, D = x.shape
        cfg, E = self.cfg, self.cfg.num_experts
        x_flat = x.reshape(-1, D)  # (N, D)
        route = self.router(x_flat)
        token_ids, expert_ids, weights = route.token_ids, route.expert_ids, route.weights
        tokens_per_expert = count_per_expert(expert_ids, E)  # (E,), before any drop

        num_assignments = expert_ids.numel()
        top_k = route.top_k  # assignments per token, while no token has lost any
        if cfg.capacity_factor is not None and cfg.router != "expert_choice":
            capacity = math.ceil(cfg.capacity_factor * B * T * cfg.top_k / E)
            keep = capacity_keep_mask(expert_ids, weights.detach(), capacity, E)
            token_ids, expert_ids, weights = token_ids[keep], expert_ids[keep], weights[keep]
            top_k = 0

        out = self.dispatcher.run(self.experts, x_flat, token_ids, expert_ids, weights,
                                  top_k=top_k)  # (N, D)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_flat)

        aux_loss, z_loss = self._balance_losses(route, tokens_per_expert, B, T)
        if not self.recomputing:
            self._record_stats(route, tokens_per_expert, expert_ids.numel(), num_assignments,
                               aux_loss, z_loss)
        total = self.balance_cfg.aux_loss_coef * aux_loss + self.balance_cfg.z_loss_coef * z_loss
        return out.view(B, T, D).to(x.dtype), total

    @torch.no_grad()
    def _record_stats(self, route, tokens_per_expert, kept, num_assignments, aux_loss, z_loss):
        if self.training:
            self.step_tokens_per_expert += tokens_per_expert.to(self.step_tokens_per_expert.dtype)
        # Kept on device; balance.moe_layer_stats moves all layers' stats in one transfer.
        self.last_stats = {
            "tokens_per_expert": tokens_per_expert.detach(),
            # torch.full, not torch.tensor: no host-to-device copy (a sync on CUDA)
            "dropped_fraction": torch.full((), 1.0 - kept / max(num_assignments, 1),
                                           device=tokens_per_expert.device),
            "aux_loss": aux_loss.detach(),
            "z_loss": z_loss.detach(),
            # mean over tokens of the entropy of the router's distribution, in nats
            "router_entropy": -(route.probs * route.probs.clamp(min=1e-30).log()).sum(
                -1).mean(),
        }

    def _balance_losses(self, route, tokens_per_expert, B, T):
        bal = self.balance_cfg
        zero = route.logits.new_zeros(())
        aux_loss = z_loss = zero
        if not self.training:
            return aux_loss, z_loss
        if bal.aux_loss == "switch":
            counts = tokens_per_expert
            if bal.aux_loss_stats == "global_batch":
                # Megatron's global aux loss: f_i over every micro-batch of the optimizer step
                # so far (the step's counts, which a recomputed forward already holds), summed
                # over ranks; pop_step_loads starts the next step's from zero.
                counts = self.step_tokens_per_expert + (0 if self.recomputing else counts)
                if self.stats_reduce is not None:
                    counts = self.stats_reduce(counts)
            aux_loss = balance.switch_aux_loss(route.probs, counts)
        elif bal.aux_loss == "sequence":
            E, k = self.cfg.num_experts, route.top_k
            if bal.seq_aux_counts == "raw_topk":  # eq. 18: top-k of the affinities alone
                selected = route.probs.detach().topk(k, dim=-1).indices
            else:  # the experts the tokens went to
                selected = route.expert_ids
            aux_loss = balance.sequence_aux_loss(route.probs.view(B, T, E),
                                                 selected.reshape(B, T, k), k)
        if bal.z_loss_coef > 0:
            z_loss = balance.router_z_loss(route.logits)
        return aux_loss, z_loss
