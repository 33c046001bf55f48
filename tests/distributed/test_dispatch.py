"""The all-to-all dispatcher on its own, against the single-process permutation.

Every rank routes its own tokens to random experts; a stand-in expert (row * gate * (global
expert id + 1)) runs on the rows each dispatcher hands over. The exchanged run must give each
rank the output, the gradients of its tokens and gates, and the per-expert counts of the local
run, with and without dedup, for token-choice (k per token) and uneven assignments. `run`,
where real experts gather their rows from the received units themselves, must match one
process running the full set of experts, their weight gradients included.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from moetrain.model.experts import GroupedExperts
from moetrain.model.moe import LocalDispatcher
from moetrain.parallel.dispatch import AllToAllDispatcher
from tests.distributed.launcher import run_distributed

E, N, D, K = 8, 12, 4, 3


def stand_in_experts(dispatched, first_expert: int) -> torch.Tensor:
    """Scale each row by its gate and by (global expert id + 1): wrong rows, wrong experts or
    wrong gates all change the result."""
    local_ids = torch.repeat_interleave(torch.arange(len(dispatched.tokens_per_expert)),
                                        dispatched.tokens_per_expert)
    scale = (first_expert + local_ids + 1).to(dispatched.expert_input.dtype)
    return dispatched.expert_input * (dispatched.gates * scale)[:, None]


def routed(rank: int, drop_every: int):
    """This rank's tokens and assignments (k per token, some dropped for uneven counts)."""
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(N, D, generator=g, requires_grad=True)
    expert_ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)]).reshape(-1)
    token_ids = torch.arange(N).repeat_interleave(K)
    weights = torch.rand(N * K, generator=g, requires_grad=True)
    keep = torch.arange(N * K) % drop_every != 0 if drop_every else torch.ones(N * K, dtype=bool)
    return x, token_ids[keep], expert_ids[keep], weights, keep


def exchange(rank, world, dedup: bool, drop_every: int) -> dict:
    results = {}
    for name in ("local", "all_to_all"):
        x, token_ids, expert_ids, weights, keep = routed(rank, drop_every)
        if name == "local":
            dispatcher, first = LocalDispatcher(E), 0
        else:
            dispatcher = AllToAllDispatcher(dist.group.WORLD, E // world, dedup)
            first = rank * (E // world)
        dispatched = dispatcher.dispatch(x, token_ids, expert_ids, weights[keep])
        out = dispatcher.combine(stand_in_experts(dispatched, first), dispatched)
        (out * torch.arange(1.0, D + 1)).sum().backward()
        counts = dispatched.tokens_per_expert
        if name == "all_to_all":  # every rank's view of the global counts
            parts = [torch.empty_like(counts) for _ in range(world)]
            dist.all_gather(parts, counts)
            counts = torch.cat(parts)
        else:
            total = counts.clone()
            dist.all_reduce(total)
            counts = total
        results[name] = {"out": out.detach(), "grad_x": x.grad, "grad_w": weights.grad,
                         "counts": counts}
    return results


@functools.lru_cache(maxsize=None)
def results(dedup, drop_every):
    return run_distributed(exchange, 2, dedup, drop_every)


@pytest.mark.parametrize("dedup", [True, False], ids=["dedup", "nodedup"])
@pytest.mark.parametrize("drop_every", [0, 4], ids=["k3", "uneven"])
def test_all_to_all_dispatch_and_combine_equal_the_local_permutation(dedup, drop_every):
    for rank, r in enumerate(results(dedup, drop_every)):
        local, exchanged = r["local"], r["all_to_all"]
        assert torch.equal(exchanged["counts"], local["counts"]), f"rank {rank} counts"
        for key in ("out", "grad_x", "grad_w"):
            torch.testing.assert_close(exchanged[key], local[key], rtol=1e-6, atol=1e-7,
                                       msg=f"rank {rank} {key}")
        assert local["out"].abs().sum() > 0 and local["grad_w"].abs().sum() > 0


def run_with_experts(rank, world, dedup: bool, drop_every: int) -> dict:
    """`run` hands the experts the received units and their rows (the gathered expert walk),
    instead of dispatch's expanded rows: the same outputs and gradients as one process, the
    experts' weight gradients included (this rank's block of them)."""
    torch.manual_seed(0)  # the same full experts on every rank
    full = GroupedExperts(E, D, 6).double()
    full.init_weights(0.5)
    local = GroupedExperts(E // world, D, 6).double()
    block = slice(rank * (E // world), (rank + 1) * (E // world))
    local.load_state_dict({k: v[block] for k, v in full.state_dict().items()})
    results = {}
    for name, experts, dispatcher in (
            ("local", full, LocalDispatcher(E)),
            ("all_to_all", local, AllToAllDispatcher(dist.group.WORLD, E // world, dedup))):
        x, token_ids, expert_ids, weights, keep = routed(rank, drop_every)
        x, weights = (x.detach().double().requires_grad_(), weights.detach().double()
                      .requires_grad_())
        out = dispatcher.run(experts, x, token_ids, expert_ids, weights[keep])
        (out * torch.arange(1.0, D + 1, dtype=torch.float64)).sum().backward()
        grads = [p.grad for p in experts.parameters()]
        if name == "local":  # all ranks' tokens through one set of experts: the sum over
            for g in grads:  # ranks, of which this rank holds a block under EP
                dist.all_reduce(g)
            grads = [g[block] for g in grads]
        results[name] = {"out": out.detach(), "grad_x": x.grad, "grad_w": weights.grad,
                         "grad_experts": grads}
    return results


@pytest.mark.parametrize("dedup", [True, False], ids=["dedup", "nodedup"])
def test_run_lets_the_experts_gather_from_the_received_units(dedup):
    for rank, r in enumerate(run_distributed(run_with_experts, 2, dedup, 4)):
        local, exchanged = r["local"], r["all_to_all"]
        for key in ("out", "grad_x", "grad_w"):
            torch.testing.assert_close(exchanged[key], local[key], msg=f"rank {rank} {key}")
        for g, g_ref in zip(exchanged["grad_experts"], local["grad_experts"]):
            torch.testing.assert_close(g, g_ref, msg=f"rank {rank} expert gradients")
            assert g.abs().sum() > 0
