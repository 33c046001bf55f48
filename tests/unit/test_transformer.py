import math

import pytest
import torch

from moetrain.config import ModelConfig, MoEConfig
from moetrain.loss import next_token_loss
from moetrain.model import Transformer, num_params
from moetrain.presets import tiny_deepseek, tiny_mixtral

FAMILIES = {"mixtral": tiny_mixtral(), "deepseek": tiny_deepseek()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_model_overfits_one_batch(family):
    torch.manual_seed(0)
    model = Transformer(FAMILIES[family])
    tokens = torch.randint(0, 64, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    from moetrain.model.balance import pop_step_loads, update_expert_bias
    for _ in range(150):
        logits, aux = model(tokens[:, :-1])
        loss = next_token_loss(logits, tokens)
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()
        if model.cfg.balance.aux_free:
            update_expert_bias(model.moe_layers(), pop_step_loads(model.moe_layers()), 1e-3)
    assert loss.item() < 0.2 * math.log(64), loss.item()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_causal_future_tokens_do_not_change_past_logits(family):
    torch.manual_seed(0)
    model = Transformer(FAMILIES[family]).eval()
    tokens = torch.randint(0, 64, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = torch.randint(0, 64, (2, 6))
    a, _ = model(tokens)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])


def test_gqa_equals_attention_with_repeated_kv_heads():
    from moetrain.model.transformer import Attention, rope_tables
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_heads=4, n_kv_heads=2, moe=None)
    attn = Attention(cfg)
    attn.init_weights(0.2)
    cos, sin = rope_tables(8, 16, 10000.0)
    x = torch.randn(2, 10, 32)
    full = ModelConfig(dim=32, n_heads=4, n_kv_heads=4, moe=None)
    mha = Attention(full)
    with torch.no_grad():
        mha.wq.weight.copy_(attn.wq.weight)
        mha.wo.weight.copy_(attn.wo.weight)
        # kv head j serves query heads 2j and 2j+1
        mha.wk.weight.copy_(attn.wk.weight.view(2, 8, 32).repeat_interleave(2, 0).view(32, 32))
        mha.wv.weight.copy_(attn.wv.weight.view(2, 8, 32).repeat_interleave(2, 0).view(32, 32))
    torch.testing.assert_close(attn(x, cos, sin), mha(x, cos, sin))


def test_meta_device_build_and_parameter_counts():
    cfg = ModelConfig(vocab_size=1000, dim=64, n_layers=3, n_heads=4, first_k_dense=1,
                      moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=32))
    with torch.device("meta"):
        model = Transformer(cfg)
    counts = num_params(model)
    expert = 3 * 64 * 32
    assert counts["total"] - counts["active"] == 2 * (8 - 2) * expert
    model.to_empty(device="cpu")
    model.init_weights()
    logits, _ = model(torch.randint(0, 1000, (1, 8)))
    assert torch.isfinite(logits).all()


def test_tied_embeddings_share_storage_and_sequence_limit():
    model = Transformer(ModelConfig(tie_embeddings=True, moe=None, max_seq_len=8))
    assert model.output.weight is model.tok_embeddings.weight
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_rotary_tables_keep_their_precision_through_dtype_casts():
    """fp64 models rotate with fp64 tables (not fp32 values widened), and a round trip
    through bf16 leaves the fp32 tables exact: apply_rope casts them to the activations'."""
    cfg = tiny_mixtral(max_seq_len=64)
    positions = torch.arange(64, dtype=torch.float64)
    head_dim = cfg.dim // cfg.n_heads
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64)
                                        / head_dim)
    exact = torch.outer(positions, inv_freq).cos()  # fp64, from the definition
    model = Transformer(cfg)
    fp32 = model.rope_cos.clone()
    assert fp32.dtype == torch.float32
    model.to(torch.float64)
    assert model.rope_cos.dtype == torch.float64
    assert (model.rope_cos - exact).abs().max() < 1e-15
    model.to(torch.bfloat16).to(torch.float32)
    assert torch.equal(model.rope_cos, fp32)


def test_a_bf16_default_dtype_model_builds_from_meta_with_fp32_counts():
    """Under torch.set_default_dtype(bf16) the load counts and the aux-free bias are still
    fp32 (bf16 counts 257 tokens as 256), and the trainer's meta build materialises."""
    from moetrain.config import ParallelConfig
    from moetrain.parallel import parallelize
    cfg = tiny_deepseek()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        direct = Transformer(cfg)
        direct.init_weights(0)
        with torch.device("meta"):
            model = Transformer(cfg)
        parallelize(model, None, ParallelConfig(), seed=0)
    finally:
        torch.set_default_dtype(previous)
    for built in (direct, model):
        moe = built.moe_layers()[0]
        assert moe.step_tokens_per_expert.dtype == moe.router.expert_bias.dtype == torch.float32
        assert moe.router.weight.dtype == torch.bfloat16
        moe.step_tokens_per_expert += 257.0
        assert moe.step_tokens_per_expert[0].item() == 257.0
    assert all(torch.equal(a, b) for a, b in zip(direct.state_dict().values(),
                                                model.state_dict().values()))
