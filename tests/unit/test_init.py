"""Layout-free initialisation: values depend on (seed, parameter name, row) only. That every
sharded layout draws exactly one process's values is checked by the equivalence gate."""

import dataclasses

import pytest
import torch

from moetrain.config import ModelConfig, MoEConfig
from moetrain.model import Transformer

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, first_k_dense=1,
                  moe=MoEConfig(router="sigmoid", num_experts=8, top_k=2, expert_hidden=16,
                                n_shared_experts=1))


def initialised(cfg, seed):
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed)
    return model.state_dict()


def test_init_is_a_function_of_seed_and_name():
    a, b, c = initialised(CFG, 3), initialised(CFG, 3), initialised(CFG, 4)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    weights = [k for k in a if k.endswith(("weight", "w_gate", "w_up", "w_down"))
               and "norm" not in k]
    assert all(not torch.equal(a[k], c[k]) for k in weights)
    # a deeper model shares the values of every parameter the two have in common
    deeper = initialised(dataclasses.replace(CFG, n_layers=5), 3)
    for key in a:
        assert torch.equal(a[key], deeper[key]), key


def test_init_statistics_and_constants():
    state = initialised(CFG, 0)
    for key, value in state.items():
        if "norm" in key:
            assert torch.equal(value, torch.ones_like(value)), key
        elif key.endswith("expert_bias"):
            assert torch.equal(value, torch.zeros_like(value)), key
        else:
            std = 1.0 if key == "tok_embeddings.weight" else CFG.init_std
            n = value.numel()  # 5 standard errors of the sample's std and mean
            assert abs(value.std().item() / std - 1) < 5 / (2 * n) ** 0.5, key
            assert abs(value.mean().item()) < 5 * std / n ** 0.5, key
    # rows of one parameter are independent draws, not copies
    experts = state["layers.1.ffn.experts.w_up"]
    assert not torch.equal(experts[0], experts[1])


def test_embedding_std_follows_its_setting_and_tying():
    untied = initialised(CFG, 0)["tok_embeddings.weight"]
    tied = initialised(dataclasses.replace(CFG, tie_embeddings=True), 0)["tok_embeddings.weight"]
    chosen = initialised(dataclasses.replace(CFG, embed_init_std=0.5), 0)["tok_embeddings.weight"]
    # the same draws, scaled: 1.0 untied, init_std when the matrix is also the output layer
    torch.testing.assert_close(tied, untied * CFG.init_std)
    torch.testing.assert_close(chosen, untied * 0.5)
    with pytest.raises(ValueError, match="model.embed_init_std=0"):
        dataclasses.replace(CFG, embed_init_std=0.0).validate()


def test_no_two_rows_share_a_stream():
    """Row i of the parameter keyed b used to be a generator seeded b + i, of which torch keeps
    32 bits: the rows of parameters keyed a few apart (mod 2**32) were copies."""
    from moetrain.model.init import _draw
    base = 0x5DEECE66D_1234
    first = _draw(base, 1, (64,), 1.0)
    for other in (_draw(base + 1, 0, (64,), 1.0), _draw(base + 2**32, 1, (64,), 1.0),
                  _draw(base + 2**40 + 1, 0, (64,), 1.0), _draw(base, 2, (64,), 1.0)):
        assert not torch.equal(first, other)
    assert torch.equal(first, _draw(base, 1, (64,), 1.0))
