import pytest
import torch

from moetrain.config import BalanceConfig, MoEConfig
from moetrain.model.moe import MoE

from tests.unit.reference import naive_moe

MOE_CASES = {
    "mixtral": dict(num_experts=8, top_k=2, router="softmax_topk"),
    "mixtral_capacity": dict(num_experts=8, top_k=2, router="softmax_topk",
                             capacity_factor=0.75),
    "switch_capacity": dict(num_experts=4, top_k=1, router="top1", capacity_factor=1.0),
    "deepseek": dict(num_experts=16, top_k=4, router="sigmoid", n_groups=4, topk_groups=2,
                     route_scale=2.5, n_shared_experts=2, shared_hidden=6),
    "deepseek_capacity": dict(num_experts=16, top_k=4, router="sigmoid", n_groups=4,
                              topk_groups=2, route_scale=2.5, n_shared_experts=1,
                              capacity_factor=0.5),
    "expert_choice": dict(num_experts=4, top_k=2, router="expert_choice", capacity_factor=1.0),
}


def make_moe(dim=12, **kw):
    torch.manual_seed(0)
    cfg = MoEConfig(expert_hidden=10, **kw)
    cfg.validate()
    moe = MoE(dim, cfg, BalanceConfig())
    moe.init_weights(std=0.3)
    if hasattr(moe.router, "expert_bias"):
        moe.router.expert_bias.copy_(torch.randn(cfg.num_experts) * 0.05)
    return moe


@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_moe_forward_and_gradients_match_per_token_loop(case):
    moe = make_moe(**MOE_CASES[case])
    x = torch.randn(2, 12, 12, requires_grad=True)
    out, _ = moe(x)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *moe.parameters()], grad_out)

    x_ref = x.detach().clone().requires_grad_(True)
    ref = naive_moe(moe, x_ref.view(-1, 12)).view(2, 12, 12)
    ref_grads = torch.autograd.grad(ref, [x_ref, *moe.parameters()], grad_out,
                                    allow_unused=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    names = ["input"] + [n for n, _ in moe.named_parameters()]
    for name, g, g_ref in zip(names, grads, ref_grads):
        if g_ref is None:
            g_ref = torch.zeros_like(g)
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")
    # the router learns through its gate weights (equal to the loop's, and not all zero)
    assert dict(zip(names, grads))["router.weight"].abs().sum() > 0


def test_capacity_drops_are_counted_and_dropless_drops_nothing():
    moe = make_moe(num_experts=4, top_k=2, capacity_factor=0.5)
    moe(torch.randn(1, 32, 12))
    stats = moe.last_stats
    # capacity = ceil(0.5 * 32 * 2 / 4) = 8 per expert: at most 32 of 64 assignments survive
    assert stats["dropped_fraction"].item() >= 0.5
    assert stats["tokens_per_expert"].sum().item() == 64  # counted before the drop
    dropless = make_moe(num_experts=4, top_k=2)
    dropless(torch.randn(1, 32, 12))
    assert dropless.last_stats["dropped_fraction"].item() == 0.0


def test_dropped_token_passes_through_with_zero_routed_output():
    moe = make_moe(num_experts=2, top_k=1, router="top1", capacity_factor=0.5)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 100.0  # every token with x[0] > 0 wants expert 0
    x = torch.ones(1, 8, 12)  # all identical -> all want expert 0; capacity = 2
    out, _ = moe(x)
    nonzero_rows = (out.view(8, 12).abs().sum(-1) > 0).sum().item()
    assert nonzero_rows == 2


def test_permuted_dispatch_matches_gather_and_index_add():
    """The CUDA path for dropless token choice (rows moved by permutation, no atomic
    index_add), run here on CPU: the same output and gradients as the gather/index_add path."""
    from moetrain.model.moe import _SortedRows, _TokenSums

    moe = make_moe(**MOE_CASES["deepseek"])
    x = torch.randn(24, 12, requires_grad=True)
    route = moe.router(x)
    grad_out = torch.randn(24, 12)
    outs, grads = [], []
    for permuted in (False, True):
        args = (moe.experts, x, route.token_ids, route.expert_ids, route.weights)
        if permuted:
            out = moe.dispatcher.run_permuted(*args, top_k=route.top_k)
        else:
            out = moe.dispatcher.run(*args)
        outs.append(out)
        grads.append(torch.autograd.grad(out, [x, *moe.parameters()], grad_out,
                                         retain_graph=True, allow_unused=True))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    for g, g_ref in zip(grads[1], grads[0]):
        if g_ref is not None:
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)

    # each direction's hand-written backward, against finite differences
    N, k = 7, 3
    expert_ids = torch.randint(0, 5, (N * k,))
    order = torch.argsort(expert_ids, stable=True)
    inverse = torch.argsort(order)
    token_of_sorted = order // k
    rows_in = torch.randn(N, 4, dtype=torch.float64, requires_grad=True)
    sums_in = torch.randn(N * k, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: _SortedRows.apply(t, token_of_sorted, inverse, k), (rows_in,))
    assert torch.autograd.gradcheck(
        lambda t: _TokenSums.apply(t, token_of_sorted, inverse, k), (sums_in,))
    torch.testing.assert_close(_TokenSums.apply(sums_in, token_of_sorted, inverse, k),
                               torch.zeros(N, 4, dtype=torch.float64).index_add(
                                   0, token_of_sorted, sums_in))
