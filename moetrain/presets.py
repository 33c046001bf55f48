"""Named model configurations that the tests and the benchmark scripts share.

`tiny_mixtral`, `tiny_deepseek` and `tiny_expert_choice` are the small models the tests build
(tests/unit/test_transformer.py, test_activation_checkpointing.py, test_generate.py and the
distributed equivalence gate in tests/distributed/workers.py): each family's recipe (router,
groups, shared experts, balancing) is written here once, and a test passes keyword overrides
for what it changes (ModelConfig fields, plus `moe=` / `balance=` dicts of MoEConfig /
BalanceConfig fields). `bench_moe_layers` holds the MoE layers that scripts/bench_moe.py and
scripts/bench_ep.py time, and `shipped_model` reads a model of configs/model/ for the scripts
that measure one. Changing a value here changes every test that uses it without an override.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from omegaconf import OmegaConf

from moetrain.config import BalanceConfig, ModelConfig, MoEConfig

# configs/ is in the repository, next to the package, and is not installed with it.
MODEL_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"


def _with_overrides(base: ModelConfig, model: dict, moe: dict | None,
                    balance: dict | None) -> ModelConfig:
    return dataclasses.replace(base, **model, moe=dataclasses.replace(base.moe, **(moe or {})),
                               balance=dataclasses.replace(base.balance, **(balance or {})))


def tiny_mixtral(*, moe: dict | None = None, balance: dict | None = None,
                 **model) -> ModelConfig:
    """Mixtral's recipe at dim 32: 2 MoE layers of 8 experts, softmax top-2, the switch loss
    and a z-loss."""
    base = ModelConfig(
        vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
        moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=32),
        balance=BalanceConfig(aux_loss="switch", aux_loss_coef=0.01, z_loss_coef=1e-3))
    return _with_overrides(base, model, moe, balance)


def tiny_deepseek(*, moe: dict | None = None, balance: dict | None = None,
                  **model) -> ModelConfig:
    """DeepSeek-V3's recipe at dim 32: a dense first layer, then 2 MoE layers of 16 experts
    with sigmoid routing limited to 2 of 4 groups, top-4, one shared expert, the sequence loss
    and aux-loss-free bias balancing."""
    base = ModelConfig(
        vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=32,
        first_k_dense=1, ffn_hidden=64,
        moe=MoEConfig(num_experts=16, top_k=4, expert_hidden=16, router="sigmoid", n_groups=4,
                      topk_groups=2, route_scale=2.5, n_shared_experts=1),
        balance=BalanceConfig(aux_loss="sequence", aux_loss_coef=1e-3, aux_free=True))
    return _with_overrides(base, model, moe, balance)


def tiny_expert_choice(*, moe: dict | None = None, balance: dict | None = None,
                       **model) -> ModelConfig:
    """`tiny_mixtral` with expert-choice routing: each expert takes its capacity of tokens
    (capacity_factor 1.0: as many assignments as top-2), so a token gets a variable number of
    experts. No auxiliary loss: the routing balances by construction; the z-loss stays."""
    return tiny_mixtral(moe={"router": "expert_choice", "capacity_factor": 1.0, **(moe or {})},
                        balance={"aux_loss": "none", **(balance or {})}, **model)


def bench_moe_layers() -> dict[str, MoEConfig]:
    """The MoE layers the layer benchmarks time: Mixtral-shaped (8 wide experts, top-2),
    DeepSeek-shaped (64 fine-grained experts, top-8, without and with one shared expert) and
    deepseek_tiny's layer (32 experts of 64, top-6, 2 shared; at --dim 128 --tokens 2048 it
    is one MoE layer of a deepseek_tiny training step)."""
    return {"E8k2": MoEConfig(num_experts=8, top_k=2, expert_hidden=1024),
            "E64k8": MoEConfig(num_experts=64, top_k=8, expert_hidden=256),
            "E64k8s1": MoEConfig(num_experts=64, top_k=8, expert_hidden=256,
                                 n_shared_experts=1),
            "E32k6s2": MoEConfig(num_experts=32, top_k=6, expert_hidden=64, n_groups=4,
                                 topk_groups=2, router="sigmoid", n_shared_experts=2,
                                 shared_hidden=64)}


# The balance config group (configs/balance/) each tiny family ships with: what the quickstart
# examples, the benchmarks and the real-text tests pair with model=<family>.
SHIPPED_BALANCE = {"mixtral_tiny": "switch_aux", "deepseek_tiny": "aux_free", "dense_tiny": "none"}


def shipped_model(name: str, with_balance: bool = False) -> ModelConfig:
    """The values of configs/model/<name>.yaml over ModelConfig's defaults, for a repository
    checkout: configs/ is not installed with the package. Hydra's composition also applies a
    balance group; with_balance applies the one the model ships with (SHIPPED_BALANCE)."""
    values = OmegaConf.load(MODEL_CONFIG_DIR / f"{name}.yaml")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), values))
    if with_balance:
        group = OmegaConf.load(MODEL_CONFIG_DIR.parent / "balance" /
                               f"{SHIPPED_BALANCE.get(name, 'none')}.yaml")
        cfg.balance = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BalanceConfig),
                                                          group))
    return cfg
