import pytest

from moetrain.config import BalanceConfig, ModelConfig, MoEConfig


def model(moe=None, balance=None, **kw):
    return ModelConfig(moe=moe or MoEConfig(), balance=balance or BalanceConfig(), **kw)


INVALID = [
    (dict(moe=MoEConfig(num_experts=4, top_k=5)), "moe.top_k=5"),
    (dict(moe=MoEConfig(num_experts=10, top_k=2, router="sigmoid", n_groups=4)),
     "model.moe.num_experts=10 is not divisible into model.moe.n_groups=4"),
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
    (dict(moe=MoEConfig(route_scale=float("inf"))), "moe.route_scale=inf"),
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
    (dict(norm_eps=0.0), "model.norm_eps=0.0"),
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


PARALLEL_INVALID = [
    (dict(data_parallel="zero3"), 4, "parallel.data_parallel='zero3' is not one of fsdp, ddp"),
    (dict(dp_replicate=3), 4, "parallel.dp_replicate=3 does not divide the world size 4; "
                              "valid: [1, 2, 4]"),
    (dict(dp_replicate=2, data_parallel="ddp"), 4, "parallel.dp_replicate=2 (HSDP) needs "
                                                   "parallel.data_parallel=fsdp, not 'ddp'"),
    (dict(dp_replicate=4), 4, "parallel.dp_replicate=4 leaves one rank per shard group "
                              "(world size 4): that is plain replication, use "
                              "parallel.dp_replicate=1 parallel.data_parallel=ddp; valid: [1, 2]"),
    (dict(dp_replicate=2, ep=3), 8, "parallel.ep=3 does not divide the 4 ranks of a shard "
                                    "group (world 8 / parallel.dp_replicate=2); valid: [1, 2, 4]"),
    (dict(ep=0), 4, "parallel.ep=0 must be >= 1"),
    # valid values divide the ranks and the 8 experts
    (dict(ep=2), 3, "parallel.ep=2 does not divide the world size 3; valid: [1]"),
    (dict(ep=3), 3, "model.moe.num_experts=8 is not divisible by parallel.ep=3; valid: [1]"),
    (dict(ep=3), 12, "model.moe.num_experts=8 is not divisible by parallel.ep=3; valid: "
                     "[1, 2, 4]"),
]


@pytest.mark.parametrize("kwargs,world,message", PARALLEL_INVALID,
                         ids=[m[:40] for _, _, m in PARALLEL_INVALID])
def test_invalid_layout_raises_one_line_naming_the_value(kwargs, world, message):
    from moetrain.config import ParallelConfig
    with pytest.raises(ValueError) as info:
        ParallelConfig(**kwargs).validate(world, 8)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_valid_layouts_pass():
    from moetrain.config import ParallelConfig
    ParallelConfig(ep=2, dp_replicate=2).validate(8, 8)  # HSDP 2 x 4, ep within a group
    ParallelConfig(ep=4, data_parallel="ddp").validate(4, 8)


RUN_INVALID = [
    ("data", dict(path="/data/train.jsonl"), "data.path='/data/train.jsonl' is set, but "
     "data.source='synthetic' reads no files; for local files use data=local_text"),
    ("data", dict(source="python_stdlib", val_path="v.txt"), "data.val_path='v.txt' is set"),
    ("data", dict(synthetic_val_docs=0), "data.synthetic_val_docs=0 must be >= 1"),
    ("data", dict(seed=2**64), f"data.seed={2**64} must fit in 64 bits"),
    ("train", dict(seed=-(2**70)), f"train.seed={-(2**70)} must fit in 64 bits"),
    ("train", dict(peak_tflops=0.0), "train.peak_tflops=0.0 must be > 0"),
    ("optim", dict(eps=-1.0), "optim.eps=-1.0 must be >= 0 and finite"),
    ("optim", dict(lr=float("inf")), "optim.lr=inf must be > 0 and finite"),
]


@pytest.mark.parametrize("section,kwargs,message", RUN_INVALID,
                         ids=[m[:40] for _, _, m in RUN_INVALID])
def test_invalid_run_settings_raise_one_line_naming_the_value(section, kwargs, message):
    from moetrain.config import DataConfig, LoopConfig, OptimConfig
    made = {"data": DataConfig, "train": LoopConfig, "optim": OptimConfig}[section](**kwargs)
    with pytest.raises(ValueError) as info:
        made.validate()
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_huge_data_seeds_still_draw_an_order():
    import torch

    from moetrain.data.loader import ShardedBlocks
    for seed in (2**45, 2**63 - 1, -5):
        assert ShardedBlocks(torch.arange(8).unsqueeze(1), 2, 1, 0, 1, seed).next_batch().shape \
            == (2, 1)


@pytest.mark.parametrize("value", ["0", "-2", "abc", ""])
def test_a_bad_world_size_in_the_environment_is_one_line(monkeypatch, value):
    from moetrain.train.setup import world_size_from_env
    monkeypatch.setenv("WORLD_SIZE", value)
    with pytest.raises(ValueError) as error:
        world_size_from_env()
    assert str(error.value) == (f"WORLD_SIZE={value!r} must be an integer >= 1 (the number of "
                                "ranks)")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert world_size_from_env() == 4
