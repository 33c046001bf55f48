import pytest
import torch

from moetrain.model import experts as experts_module
from moetrain.model.experts import GroupedExperts, walk_blocks


@pytest.fixture(params=[None, 1, 6], ids=["one-block", "expert-per-block", "6-row-blocks"])
def block_rows(request, monkeypatch):
    """The CPU walk's block size: the default (every expert of these small tests in one
    block), one row (every expert alone) and six rows (several small experts share a block,
    a larger one is alone). Call it with the walk's width, max(D, hidden)."""
    def set_rows(width: int) -> None:
        if request.param is not None:
            monkeypatch.setattr(experts_module, "WALK_BLOCK_ELEMENTS", request.param * width)
    return set_rows


def test_walk_blocks_group_consecutive_experts_up_to_the_budget():
    blocks = walk_blocks([3, 0, 5, 1, 0, 2], width=2, budget=8)  # up to 4 rows a block
    assert blocks == [(slice(0, 3), [(0, slice(0, 3))]),
                      (slice(3, 8), [(2, slice(0, 5))]),  # more than 4 rows: alone
                      (slice(8, 11), [(3, slice(0, 1)), (5, slice(1, 3))])]
    assert walk_blocks([0, 0], width=2) == []


def per_expert_reference(experts, x, counts, gates):
    rows, start = [], 0
    for e, n in enumerate(counts):
        xe = x[start:start + n]
        h = torch.nn.functional.silu(xe @ experts.w_gate[e].t()) * (xe @ experts.w_up[e].t())
        rows.append((h @ experts.w_down[e].t()) * gates[start:start + n, None])
        start += n
    return torch.cat(rows)


def test_grouped_experts_match_per_expert_swiglu_including_empty_experts(block_rows):
    block_rows(12)
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


def test_gathered_walk_equals_gather_experts_scatter_with_gradients(block_rows):
    """With row_ids the experts read token rows and adds outputs back itself: the same function as
    index_select -> forward -> index_add, gradients included (tokens with 0, 1 or 3 rows)."""
    block_rows(10)
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
