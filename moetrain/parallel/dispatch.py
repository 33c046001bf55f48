"""All-to-all token dispatch and combine for expert parallelism.

Experts are sharded in contiguous blocks: rank r of the ep group holds global experts
[r * E_local, (r + 1) * E_local). One layer's exchange:

  1. group the local assignments into *units* (rows of x to send), ordered by destination rank.
     Without dedup a unit is one assignment; with dedup it is one (token, destination rank)
     pair, so a token whose top-k experts share a rank crosses the wire once.
  2. all-to-all the counts (units and assignments per rank), then, with uneven splits,
     the unit rows, the assignments' gate weights and their (local expert, unit) indices.
  3. the receiver's experts take each received assignment's row from its unit (sorted by
     local expert), and the gate-weighted outputs of each unit are summed and sent back (the
     reverse exchange); `run` lets the experts gather and sum themselves, as in one process.
  4. the sender scatter-adds returned units into their tokens.

Autograd: every data exchange is `_AllToAll`, whose backward is the reverse exchange, so
gradients of tokens, gate weights (hence the router) and experts equal one process's.
Shapes: N local tokens, M local assignments, U units sent, R units received, A assignments
received, D model dim, P = ep size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moetrain.model.moe import Dispatched, count_per_expert


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits along dim 0; backward runs the reverse exchange."""

    @staticmethod
    def forward(ctx, x, output_splits: list[int], input_splits: list[int], group):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = grad_out.new_empty((sum(ctx.input_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), ctx.input_splits,
                               ctx.output_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x, output_splits, input_splits, group):
    return _AllToAll.apply(x, output_splits, input_splits, group)


@dataclass
class AllToAllDispatched(Dispatched):
    """`Dispatched` plus what the return exchange needs: token_ids are the local tokens of the
    U units this rank sent (in send order); recv_rows (A,) the received unit behind each
    expert-input row; the split sizes of both directions."""

    recv_rows: torch.Tensor
    num_recv_units: int
    units_sent: list[int]
    units_received: list[int]


class AllToAllDispatcher:
    """Drop-in replacement for the MoE layer's LocalDispatcher, installed by `parallelize`.
    This rank holds global experts [ep_rank * num_local_experts, (ep_rank + 1) * ...)."""

    def __init__(self, group, num_local_experts: int, dedup: bool):
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.num_local_experts = num_local_experts
        self.dedup = dedup
        # Rows and assignments the last dispatch sent, by destination rank (for benchmarks).
        self.last_sent = {"rows": [], "assignments": []}

    def dispatch(self, x, token_ids, expert_ids, weights, expand: bool = True
                 ) -> AllToAllDispatched:
        """Steps 1-2 and the expansion of step 3: expert_input (A, D), one row per received
        assignment, sorted by local expert. expand=False leaves expert_input the (R, D)
        received units, which recv_rows index."""
        N = x.shape[0]
        P, device = self.ep_size, x.device
        local_experts = self.num_local_experts
        dest = expert_ids // local_experts  # (M,)
        M = expert_ids.numel()
        if self.dedup:  # one unit per (destination, token); torch.unique sorts by destination
            unit_keys, unit_of_assignment = torch.unique(dest * N + token_ids, return_inverse=True)
            unit_dest, unit_token = unit_keys // N, unit_keys % N
            order = torch.argsort(unit_of_assignment, stable=True)  # assignments by unit
        else:  # one unit per assignment
            order = torch.argsort(dest, stable=True)
            unit_of_assignment = torch.empty_like(order)
            unit_of_assignment[order] = torch.arange(M, device=device)
            unit_dest, unit_token = dest[order], token_ids[order]
        units_per_rank = torch.bincount(unit_dest, minlength=P)
        assignments_per_rank = torch.bincount(dest, minlength=P)
        unit_start = torch.cumsum(units_per_rank, 0) - units_per_rank
        sorted_dest = dest[order]
        meta = torch.stack([expert_ids[order] - sorted_dest * local_experts,  # local expert
                            unit_of_assignment[order] - unit_start[sorted_dest]],  # unit in chunk
                           dim=1).to(torch.int32)  # (M, 2)

        send_counts = torch.stack([units_per_rank, assignments_per_rank], dim=1)  # (P, 2)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        # NOTE: the one device-to-host sync of this layer: split sizes must live on the host.
        counts = torch.cat([send_counts, recv_counts], dim=1).tolist()
        unit_send = [c[0] for c in counts]
        assign_send = [c[1] for c in counts]
        unit_recv = [c[2] for c in counts]
        assign_recv = [c[3] for c in counts]

        recv_units = all_to_all(x.index_select(0, unit_token), unit_recv, unit_send, self.group)
        recv_weights = all_to_all(weights[order], assign_recv, assign_send, self.group)
        recv_meta = all_to_all(meta, assign_recv, assign_send, self.group).long()  # (A, 2)

        # Row of each received assignment inside recv_units: its source's block + offset.
        recv_unit_counts = torch.tensor(unit_recv, device=device)
        recv_unit_start = torch.cumsum(recv_unit_counts, 0) - recv_unit_counts
        source = torch.repeat_interleave(torch.arange(P, device=device),
                                         torch.tensor(assign_recv, device=device))
        row = recv_unit_start[source] + recv_meta[:, 1]  # (A,)
        local_expert = recv_meta[:, 0]
        perm = torch.argsort(local_expert, stable=True)
        row = row[perm]
        tokens_per_local_expert = count_per_expert(local_expert, local_experts)
        self.last_sent = {"rows": unit_send, "assignments": assign_send}
        return AllToAllDispatched(
            expert_input=recv_units.index_select(0, row) if expand else recv_units,
            gates=recv_weights[perm],
            tokens_per_expert=tokens_per_local_expert, token_ids=unit_token, num_tokens=N,
            recv_rows=row, num_recv_units=recv_units.shape[0], units_sent=unit_send,
            units_received=unit_recv)

    def run(self, experts, x, token_ids, expert_ids, weights, top_k: int = 0):
        """dispatch -> this rank's experts -> combine: (N, D) routed output. The experts
        gather their rows from the received units and sum each unit's gate-weighted outputs
        themselves (GroupedExperts with row_ids), as in one process: no (A, D) copy of the
        rows or of the outputs. (top_k: see LocalDispatcher.run; the exchange needs no such
        promise.)"""
        received = self.dispatch(x, token_ids, expert_ids, weights, expand=False)
        unit_out = experts(received.expert_input, received.tokens_per_expert, received.gates,
                           row_ids=received.recv_rows)  # (R, D)
        return self._send_back(unit_out, received)

    def combine(self, expert_output, dispatched: AllToAllDispatched):
        """expert_output (A, D) in `dispatch` order -> routed output (N, D)."""
        D = expert_output.shape[-1]
        # Sum each unit's gate-weighted expert outputs here, before the wire (dedup's saving).
        unit_out = expert_output.new_zeros(dispatched.num_recv_units, D).index_add(
            0, dispatched.recv_rows, expert_output)
        return self._send_back(unit_out, dispatched)

    def _send_back(self, unit_out, dispatched: AllToAllDispatched):
        """Step 4: (R, D) unit outputs back to their senders, added into their tokens."""
        returned = all_to_all(unit_out, dispatched.units_sent, dispatched.units_received,
                              self.group)  # (U, D)
        return returned.new_zeros(dispatched.num_tokens, unit_out.shape[-1]).index_add(
            0, dispatched.token_ids, returned)
