import pytest
import torch

from moetrain.config import MoEConfig
from moetrain.model.router import Router

from tests.unit.reference import naive_assignments


def make_router(dim=16, **kw):
    torch.manual_seed(0)
    cfg = MoEConfig(**kw)
    cfg.validate()
    router = Router(dim, cfg)
    router.init_weights(std=0.5)
    return router


ROUTER_CASES = {
    "mixtral_top2": dict(num_experts=8, top_k=2, router="softmax_topk"),
    "softmax_no_renorm": dict(num_experts=8, top_k=3, router="softmax_topk",
                              norm_topk_prob=False),
    "switch_top1": dict(num_experts=8, top_k=1, router="top1"),
    # DeepSeek-V2: a softmax router whose gates are scaled
    "softmax_scaled": dict(num_experts=8, top_k=3, router="softmax_topk", route_scale=1.7),
    "switch_scaled": dict(num_experts=8, top_k=1, router="top1", route_scale=0.5),
    "deepseek_flat": dict(num_experts=16, top_k=4, router="sigmoid", route_scale=2.5),
    "deepseek_grouped": dict(num_experts=32, top_k=8, router="sigmoid", n_groups=8,
                             topk_groups=3, route_scale=2.5),
    "deepseek_unnormalised": dict(num_experts=16, top_k=4, router="sigmoid",
                                  norm_topk_prob=False, n_groups=4, topk_groups=2),
}


class FakeMoE:
    """What naive_assignments reads: cfg and router."""

    def __init__(self, router):
        self.cfg, self.router = router.cfg, router


@pytest.mark.parametrize("case", sorted(ROUTER_CASES))
def test_router_matches_per_token_formula(case):
    router = make_router(**ROUTER_CASES[case])
    if hasattr(router, "expert_bias"):
        router.expert_bias.copy_(torch.randn(router.cfg.num_experts) * 0.1)
    x = torch.randn(40, 16)
    out = router(x)
    got = {(t, e): w for t, e, w in zip(out.token_ids.tolist(), out.expert_ids.tolist(),
                                         out.weights)}
    expected = {(t, e): w for t, e, w in naive_assignments(FakeMoE(router), x)}
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key].float(), rtol=1e-5, atol=1e-6)


def test_expert_choice_matches_per_expert_formula():
    router = make_router(num_experts=4, top_k=2, router="expert_choice", capacity_factor=1.5,
                         route_scale=1.3)
    x = torch.randn(20, 16)
    out = router(x)
    assert out.expert_ids.numel() == 4 * 15  # C = ceil(1.5 * 20 * 2 / 4)
    got = {(t, e): w for t, e, w in zip(out.token_ids.tolist(), out.expert_ids.tolist(),
                                         out.weights)}
    expected = {(t, e): w for t, e, w in naive_assignments(FakeMoE(router), x)}
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


def test_group_limited_routing_stays_inside_chosen_groups():
    router = make_router(num_experts=64, top_k=8, router="sigmoid", n_groups=8, topk_groups=2)
    router.expert_bias.copy_(torch.randn(64))
    x = torch.randn(500, 16)
    out = router(x)
    logits = x @ router.weight.t()
    selection = (logits.sigmoid() + router.expert_bias).view(500, 8, 8)
    group_scores = selection.topk(2, dim=-1).values.sum(-1)
    best_groups = group_scores.topk(2, dim=-1).indices  # (N, 2)
    chosen_groups = (out.expert_ids // 8).view(500, 8)
    for t in range(500):
        assert set(chosen_groups[t].tolist()) <= set(best_groups[t].tolist())
    # and the limit binds: without it some tokens would pick experts elsewhere
    free = (logits.sigmoid() + router.expert_bias).topk(8, dim=-1).indices // 8
    assert any(set(free[t].tolist()) - set(best_groups[t].tolist()) for t in range(500))


def test_bias_steers_selection_but_gates_use_unbiased_scores():
    router = make_router(num_experts=8, top_k=2, router="sigmoid", norm_topk_prob=False)
    x = torch.randn(64, 16)
    router.expert_bias.copy_(torch.tensor([10.0, 10.0, 0, 0, 0, 0, 0, 0]))
    out = router(x)
    assert set(out.expert_ids.tolist()) == {0, 1}  # the bias decides who is picked
    scores = (x @ router.weight.t()).sigmoid()
    torch.testing.assert_close(out.weights, scores.gather(1, out.expert_ids.view(64, 2)).view(-1))


def test_bias_is_not_a_gradient_target_and_router_grad_flows():
    router = make_router(num_experts=8, top_k=2, router="sigmoid")
    out = router(torch.randn(10, 16))
    out.weights.sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert "expert_bias" not in dict(router.named_parameters())


def test_logits_are_fp32_for_low_precision_inputs():
    router = make_router(num_experts=8, top_k=2).to(torch.bfloat16)
    out = router(torch.randn(10, 16, dtype=torch.bfloat16))
    assert out.logits.dtype == torch.float32 and out.weights.dtype == torch.float32


@pytest.mark.parametrize("router_type", ["softmax_topk", "sigmoid"])
def test_autocast_leaves_the_routing_in_fp32(router_type):
    # the trainer's one-GPU path runs the forward under bf16 autocast; CPU autocast has the
    # same rule (a linear runs in bf16 whatever its inputs' dtype)
    router = make_router(num_experts=8, top_k=2, router=router_type)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(64, 16)
    want = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = router(x)
    assert got.logits.dtype == got.weights.dtype == torch.float32
    assert torch.equal(got.logits, want.logits) and torch.equal(got.weights, want.weights)
    assert torch.equal(got.expert_ids, want.expert_ids)


def test_jitter_only_in_training_and_frozen_router_has_no_grad():
    router = make_router(num_experts=8, top_k=2, router_jitter=0.5)
    x = torch.randn(32, 16)
    router.eval()
    a, b = router(x).logits, router(x).logits
    assert torch.equal(a, b)
    router.train()
    assert not torch.equal(router(x).logits, a)
    frozen = make_router(num_experts=8, top_k=2, freeze_router=True)
    assert not frozen.weight.requires_grad


def test_jitter_of_bf16_inputs_is_uniform_around_one():
    """Switch's multiplicative noise in [1 - eps, 1 + eps], mean 1, whatever the input dtype:
    drawn in bf16 it would take 4 values from 0.988 to 1.0 and shrink the logits."""
    router = make_router(num_experts=4, top_k=2, router_jitter=0.01)
    router.weight.data = torch.eye(4, 16)  # logit e = x[:, e]: the noise itself, times x
    x = torch.ones(20000, 16, dtype=torch.bfloat16)
    noise = router.train()(x).logits
    assert noise.dtype == torch.float32
    assert abs(noise.mean().item() - 1) < 1e-3
    assert noise.min() >= 0.99 and noise.max() <= 1.01 and noise.unique().numel() > 1000
