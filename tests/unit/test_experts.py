import torch

from moetrain.model.experts import GroupedExperts, grouped_mm


def test_grouped_mm_matches_per_expert_matmul_including_empty_experts():
    torch.manual_seed(0)
    counts = [3, 0, 5, 1, 0]
    x = torch.randn(sum(counts), 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, 6, dtype=torch.float64, requires_grad=True)
    out = grouped_mm(x, w, counts)
    chunks = torch.split(x, counts)
    expected = torch.cat([c @ w[e].t() for e, c in enumerate(chunks)])
    torch.testing.assert_close(out, expected)
    assert torch.autograd.gradcheck(lambda a, b: grouped_mm(a, b, counts), (x, w))
    out.sum().backward()
    assert torch.all(w.grad[1] == 0) and torch.all(w.grad[4] == 0)


def test_grouped_experts_match_swiglu_per_expert():
    torch.manual_seed(0)
    experts = GroupedExperts(4, 8, 12)
    experts.init_weights(0.3)
    counts = torch.tensor([2, 4, 0, 3])
    x = torch.randn(9, 8)
    out = experts(x, counts)
    start = 0
    for e, n in enumerate(counts.tolist()):
        xe = x[start:start + n]
        h = torch.nn.functional.silu(xe @ experts.w_gate[e].t()) * (xe @ experts.w_up[e].t())
        torch.testing.assert_close(out[start:start + n], h @ experts.w_down[e].t())
        start += n
