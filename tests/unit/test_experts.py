import torch

from moetrain.model.experts import GroupedExperts


def per_expert_reference(experts, x, counts, gates):
    rows, start = [], 0
    for e, n in enumerate(counts):
        xe = x[start:start + n]
        h = torch.nn.functional.silu(xe @ experts.w_gate[e].t()) * (xe @ experts.w_up[e].t())
        rows.append((h @ experts.w_down[e].t()) * gates[start:start + n, None])
        start += n
    return torch.cat(rows)


def test_grouped_experts_match_per_expert_swiglu_including_empty_experts():
    torch.manual_seed(0)
    experts = GroupedExperts(5, 8, 12).double()
    experts.init_weights(0.3)
    counts = [3, 0, 5, 1, 0]
    x = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(9, dtype=torch.float64, requires_grad=True)
    out = experts(x, torch.tensor(counts), gates)
    torch.testing.assert_close(out, per_expert_reference(experts, x, counts, gates))
    params = list(experts.parameters())
    assert torch.autograd.gradcheck(
        lambda a, g, *w: experts(a, torch.tensor(counts), g), (x, gates, *params))
    out.sum().backward()
    for w in params:  # experts that saw no token get an exact zero gradient
        assert torch.all(w.grad[1] == 0) and torch.all(w.grad[4] == 0)
        assert w.grad[0].abs().sum() > 0


def test_gathered_walk_equals_gather_experts_scatter_with_gradients():
    """With row_ids the experts read token rows and adds outputs back itself: the same function as
    index_select -> forward -> index_add, gradients included (tokens with 0, 1 or 3 rows)."""
    torch.manual_seed(0)
    experts = GroupedExperts(4, 6, 10).double()
    experts.init_weights(0.3)
    counts = [3, 0, 4, 2]
    row_ids = torch.tensor([0, 2, 5, 1, 2, 3, 5, 2, 4])  # token 6 has no row
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(9, dtype=torch.float64, requires_grad=True)
    got = experts(x, torch.tensor(counts), gates, row_ids=row_ids)
    rows = experts(x.index_select(0, row_ids), torch.tensor(counts), gates)
    want = torch.zeros(7, 6, dtype=torch.float64).index_add(0, row_ids, rows)
    torch.testing.assert_close(got, want)
    assert torch.all(got[6] == 0)
    assert torch.autograd.gradcheck(
        lambda a, g, *w: experts(a, torch.tensor(counts), g, row_ids=row_ids),
        (x, gates, *experts.parameters()))
