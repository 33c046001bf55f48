"""The CUDA paths (grouped_mm in bf16, autocast). Skipped cleanly without a GPU."""

import pytest
import torch

from moetrain.config import BalanceConfig, MoEConfig
from moetrain.model.experts import GroupedExperts
from moetrain.model.moe import MoE

pytestmark = pytest.mark.gpu


def test_cuda_grouped_mm_matches_the_cpu_path_in_bf16_tolerance():
    torch.manual_seed(0)
    experts = GroupedExperts(8, 64, 128)
    experts.init_weights(0.05)
    counts = torch.tensor([40, 0, 16, 8, 24, 0, 32, 8])
    x = torch.randn(int(counts.sum()), 64)
    gates = torch.rand(len(x))
    expected = experts(x, counts, gates)
    got = experts.cuda()(x.cuda().bfloat16(), counts.cuda(), gates.cuda())
    torch.testing.assert_close(got.float().cpu(), expected, rtol=2e-2, atol=2e-2)


def test_moe_layer_trains_under_bf16_autocast():
    torch.manual_seed(0)
    moe = MoE(64, MoEConfig(num_experts=8, top_k=2, expert_hidden=64, router="sigmoid",
                            n_shared_experts=1), BalanceConfig(aux_loss="sequence")).cuda()
    moe.init_weights(0.05)
    x = torch.randn(2, 16, 64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, aux = moe(x)
    (out.float().sum() + aux).backward()
    assert torch.isfinite(x.grad).all() and moe.experts.w_gate.grad.abs().sum() > 0
