import pytest

from moetrain.config import BalanceConfig, ModelConfig, MoEConfig


def model(moe=None, balance=None, **kw):
    return ModelConfig(moe=moe or MoEConfig(), balance=balance or BalanceConfig(), **kw)


INVALID = [
    (dict(moe=MoEConfig(num_experts=4, top_k=5)), "moe.top_k=5"),
    (dict(moe=MoEConfig(num_experts=10, top_k=2, router="sigmoid", n_groups=4)),
     "moe.num_experts=10 is not divisible into moe.n_groups=4"),
    (dict(moe=MoEConfig(num_experts=16, top_k=2, router="sigmoid", n_groups=4,
                        topk_groups=5)), "moe.topk_groups=5"),
    (dict(moe=MoEConfig(num_experts=16, top_k=9, router="sigmoid", n_groups=4,
                        topk_groups=2)), "exceeds the 8 experts"),
    (dict(moe=MoEConfig(num_experts=16, top_k=2, router="softmax_topk", n_groups=4,
                        topk_groups=2)), "needs router 'sigmoid'"),
    (dict(moe=MoEConfig(num_experts=8, top_k=2, router="sigmoid", n_groups=8,
                        topk_groups=2)), "each group needs >= 2"),
    (dict(moe=MoEConfig(capacity_factor=0)), "moe.capacity_factor=0"),
    (dict(moe=MoEConfig(capacity_factor=-1.5)), "moe.capacity_factor=-1.5"),
    (dict(moe=MoEConfig(router="hash")), "moe.router='hash'"),
    (dict(moe=MoEConfig(router="top1", top_k=2)), "router 'top1'"),
    (dict(moe=MoEConfig(num_experts=0, top_k=0)), "moe.num_experts=0"),
    (dict(moe=MoEConfig(router_jitter=1.0)), "moe.router_jitter=1.0"),
    (dict(moe=MoEConfig(n_shared_experts=-1)), "moe.n_shared_experts=-1"),
    (dict(moe=MoEConfig(route_scale=0.0)), "moe.route_scale=0.0"),
    (dict(balance=BalanceConfig(aux_loss="gshard")), "balance.aux_loss='gshard'"),
    (dict(balance=BalanceConfig(aux_loss_stats="epoch")), "balance.aux_loss_stats='epoch'"),
    (dict(balance=BalanceConfig(aux_loss="sequence", aux_loss_stats="global_batch")),
     "global_batch"),
    (dict(balance=BalanceConfig(aux_loss_coef=-0.1)), "balance.aux_loss_coef=-0.1"),
    (dict(balance=BalanceConfig(aux_free=True)), "balance.aux_free=true needs"),
    (dict(balance=BalanceConfig(bias_update_rate=0.0)), "balance.bias_update_rate=0.0"),
    (dict(moe=MoEConfig(router="expert_choice"), balance=BalanceConfig(aux_loss="switch")),
     "balanced by construction"),
    (dict(dim=100, n_heads=3), "model.dim=100 is not divisible by model.n_heads=3"),
    (dict(dim=96, n_heads=32), "must be even"),
    (dict(n_heads=4, n_kv_heads=3), "model.n_kv_heads=3"),
    (dict(first_k_dense=9, n_layers=4), "model.first_k_dense=9"),
    (dict(vocab_size=0), "model.vocab_size=0"),
]


@pytest.mark.parametrize("kwargs,message", INVALID, ids=[m for _, m in INVALID])
def test_invalid_config_raises_clear_value_error(kwargs, message):
    with pytest.raises(ValueError) as info:
        model(**kwargs).validate()
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_valid_configs_pass():
    model().validate()
    model(moe=MoEConfig(num_experts=64, top_k=8, router="sigmoid", n_groups=8, topk_groups=4,
                        n_shared_experts=1),
          balance=BalanceConfig(aux_free=True, aux_loss="sequence")).validate()
    ModelConfig(moe=None).validate()
