"""LoRA: stacked expert adapters in the fused pass against a per-expert loop, the adapted
model against its base, merging, freezing and the trainer's LoRA fine-tune."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F

from moetrain.config import LoRAConfig
from moetrain.loss import next_token_loss
from moetrain.model import Transformer
from moetrain.model import experts as experts_module
from moetrain.model.experts import GroupedExperts, _grouped_mm_experts
from moetrain.model.lora import LoRALinear, apply_lora, merge_lora_, trainable_state_names
from moetrain.presets import tiny_deepseek, tiny_mixtral

ALL_TARGETS = ["experts", "shared_experts", "dense_ffn", "attention"]


@pytest.fixture(params=[None, 1, 6], ids=["one-block", "expert-per-block", "6-row-blocks"])
def block_rows(request, monkeypatch):
    """The CPU walk's block size (see tests/unit/test_experts.py): the default, one row and
    six rows, as a multiple of lora_experts' width max(D, H) = 12."""
    if request.param is not None:
        monkeypatch.setattr(experts_module, "WALK_BLOCK_ELEMENTS", request.param * 12)


def lora_experts(E=5, D=8, H=12, rank=3, scaling=2.0, dropout=0.0, dtype=torch.float64):
    torch.manual_seed(0)
    experts = GroupedExperts(E, D, H).to(dtype)
    experts.init_weights(0.3)
    experts.add_lora(rank, scaling, dropout)
    with torch.no_grad():  # B nonzero, so the adapters change the output
        for adapter in experts.adapters():
            adapter.normal_(0, 0.3)
    return experts


def per_expert_lora_reference(experts, x, counts, gates, masks=None):
    """Written from the formula: each projection W y + s B A drop(y), expert by expert."""
    s = experts.lora_scaling
    a_g, b_g, a_u, b_u, a_d, b_d = experts.adapters()
    rows, start = [], 0
    for e, n in enumerate(counts):
        xe = x[start:start + n]
        m = [None] * 3 if masks is None else [mk[start:start + n] for mk in masks]

        def drop(y, mask):
            return y if mask is None else y * mask

        gate = xe @ experts.w_gate[e].t() + s * (drop(xe, m[0]) @ a_g[e].t()) @ b_g[e].t()
        up = xe @ experts.w_up[e].t() + s * (drop(xe, m[1]) @ a_u[e].t()) @ b_u[e].t()
        h = F.silu(gate) * up
        down = h @ experts.w_down[e].t() + s * (drop(h, m[2]) @ a_d[e].t()) @ b_d[e].t()
        rows.append(down * gates[start:start + n, None])
        start += n
    return torch.cat(rows)


def test_stacked_adapters_in_the_fused_pass_match_a_per_expert_loop_with_gradients(block_rows):
    experts = lora_experts()
    counts = [3, 0, 5, 1, 0]
    x = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(9, dtype=torch.float64, requires_grad=True)
    out = experts(x, torch.tensor(counts), gates)
    torch.testing.assert_close(out, per_expert_lora_reference(experts, x, counts, gates))
    params = list(experts.parameters())
    assert len(params) == 9
    assert torch.autograd.gradcheck(
        lambda a, g, *w: experts(a, torch.tensor(counts), g), (x, gates, *params))


def test_frozen_base_weights_get_no_gradient_and_adapters_the_reference_one(block_rows):
    experts = lora_experts()
    for w in (experts.w_gate, experts.w_up, experts.w_down):
        w.requires_grad_(False)
    counts = [4, 2, 0, 3, 1]
    x = torch.randn(10, 8, dtype=torch.float64)
    gates = torch.rand(10, dtype=torch.float64)
    experts(x, torch.tensor(counts), gates).pow(2).sum().backward()
    fused = [a.grad.clone() for a in experts.adapters()]
    assert all(w.grad is None for w in (experts.w_gate, experts.w_up, experts.w_down))
    for a in experts.adapters():
        a.grad = None
    per_expert_lora_reference(experts, x, counts, gates).pow(2).sum().backward()
    for got, adapter in zip(fused, experts.adapters()):
        torch.testing.assert_close(got, adapter.grad)
        assert adapter.grad.abs().sum() > 0


def test_adapter_dropout_drops_adapter_inputs_only_while_training(block_rows):
    experts = lora_experts(dropout=0.5)
    counts = [3, 2, 0, 4, 1]
    x = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(10, dtype=torch.float64)
    experts.eval()
    torch.testing.assert_close(experts(x, torch.tensor(counts), gates),
                               per_expert_lora_reference(experts, x, counts, gates))
    experts.train()
    params = [x, *experts.parameters()]

    def seeded(*args):  # the same masks on every call, so gradcheck sees one function
        torch.manual_seed(5)
        return experts(x, torch.tensor(counts), gates)

    assert torch.autograd.gradcheck(seeded, params)
    # the masks are those of inverted dropout on each adapter's input
    torch.manual_seed(5)
    masks = [torch.empty(10, 8, dtype=torch.float64).bernoulli_(0.5).div_(0.5),
             torch.empty(10, 8, dtype=torch.float64).bernoulli_(0.5).div_(0.5),
             torch.empty(10, 12, dtype=torch.float64).bernoulli_(0.5).div_(0.5)]
    torch.testing.assert_close(seeded(), per_expert_lora_reference(experts, x, counts, gates,
                                                                  masks))
    assert not torch.allclose(seeded(), experts.eval()(x, torch.tensor(counts), gates))


def test_cuda_grouped_mm_path_with_adapters_matches_the_fused_pass():
    """The CUDA path's math, run on the CPU (torch._grouped_mm exists there too), in bf16."""
    experts = lora_experts(E=4, D=16, H=32, rank=8, dtype=torch.float32)
    counts = torch.tensor([5, 0, 7, 4])
    x = torch.randn(16, 16)
    gates = torch.rand(16)
    weights = [experts.w_gate, experts.w_up, experts.w_down]
    got = _grouped_mm_experts(x, counts, gates, *weights, experts.adapters(),
                              experts.lora_scaling, 0.0)
    want = experts(x, counts, gates)
    assert (got - want).abs().max() <= 0.03 * want.abs().max()


def test_lora_linear_starts_as_its_base_and_merges_to_the_same_function():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 4, bias=False).double()
    lora = LoRALinear(base, rank=2, scaling=4.0, dropout=0.0)
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.nn.init.normal_(lora.lora_A)
    assert torch.equal(lora(x), x @ base.weight.t())  # B = 0
    torch.nn.init.normal_(lora.lora_B)
    want = x @ base.weight.t() + 4.0 * x @ lora.lora_A.t() @ lora.lora_B.t()
    torch.testing.assert_close(lora(x), want)
    torch.testing.assert_close(lora.merged()(x), want)


def adapted(cfg, targets=ALL_TARGETS, rank=4, seed=3, **lora):
    """(base model, LoRA model on a copy of the base weights)."""
    base = Transformer(copy.deepcopy(cfg)).double()
    base.init_weights(seed)
    model = copy.deepcopy(base)
    apply_lora(model, LoRAConfig(rank=rank, alpha=8.0, targets=targets, **lora))
    with torch.no_grad():  # what init_weights gives the adapters: A random, B zero
        for name, p in model.named_parameters():
            if name.endswith("lora_A"):
                p.normal_(0, 0.3)
            elif name.endswith("lora_B"):
                p.zero_()
    return base, model


def test_lora_on_a_built_model_gets_the_adapters_init_weights_would_give():
    # the peft flow: adapters added to a model that already holds its (loaded) weights
    cfg = tiny_deepseek()
    lora = LoRAConfig(rank=4, alpha=8.0, targets=ALL_TARGETS)
    model = Transformer(copy.deepcopy(cfg))
    model.init_weights(5)
    base = {name: p.clone() for name, p in model.named_parameters()}
    apply_lora(model, lora, seed=7)
    fresh = Transformer(copy.deepcopy(cfg))
    apply_lora(fresh, lora)
    fresh.init_weights(7)
    fresh_params = dict(fresh.named_parameters())
    adapters = {name: p for name, p in model.named_parameters() if name.endswith("lora_A")}
    # 3 layers x 4 attention projections, the dense layer's 3, and per MoE layer (2) the
    # shared expert's 3 and the stacked experts' 3
    assert len(adapters) == 12 + 3 + 2 * 6
    for name, p in model.named_parameters():
        if name in base:
            assert torch.equal(p, base[name]), name  # base weights untouched
        else:
            assert torch.equal(p, fresh_params[name]), name
            assert name.endswith("lora_B") == (p.abs().sum().item() == 0), name


@pytest.mark.parametrize("family", ["mixtral", "deepseek"])
def test_lora_model_starts_exactly_as_its_base(family):
    cfg = tiny_mixtral() if family == "mixtral" else tiny_deepseek()
    targets = ALL_TARGETS if family == "deepseek" else ["experts", "attention"]
    base, model = adapted(cfg, targets)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    assert torch.equal(model(tokens)[0], base(tokens)[0])


@pytest.mark.parametrize("family", ["mixtral", "deepseek"])
def test_only_adapters_train_and_the_merged_model_has_the_lora_models_logits(family):
    cfg = tiny_mixtral() if family == "mixtral" else tiny_deepseek()
    targets = ALL_TARGETS if family == "deepseek" else ["experts", "attention"]
    base, model = adapted(cfg, targets)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith(("lora_A", "lora_B")) for n in names)
    assert any(".experts.w_down_lora_B" in n for n in names)
    assert any(".attn.wq.lora_A" in n for n in names)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    for _ in range(3):
        opt.zero_grad()
        logits, aux = model(tokens[:, :-1])
        (next_token_loss(logits, tokens) + aux).backward()
        opt.step()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in names), name
    assert {id(p) for p in opt.state} == {id(p) for n, p in model.named_parameters()
                                          if n in names}
    for key, value in base.state_dict().items():  # base weights bit-identical
        if not key.endswith("expert_bias"):
            assert torch.equal(model.state_dict()[key], value), key
    model.eval()
    with torch.no_grad():
        lora_logits = model(tokens[:, :-1])[0]
        assert not torch.allclose(lora_logits, base.eval()(tokens[:, :-1])[0])
        merge_lora_(model)
        assert not any(n.endswith(("lora_A", "lora_B")) for n in model.state_dict())
        assert set(model.state_dict()) == set(base.state_dict())
        merged = model(tokens[:, :-1])[0]
    assert (merged - lora_logits).abs().max() <= 1e-5 * lora_logits.abs().max()


def test_train_router_keeps_the_router_trainable_and_in_the_adapter_state():
    _, model = adapted(tiny_deepseek(), ["experts"], train_router=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.endswith("router.weight")}
    state = trainable_state_names(model)
    assert trainable <= state
    assert {n for n in state if n.endswith("expert_bias")}  # buffers travel with the adapters
    assert not any(n.endswith("experts.w_gate") or n == "tok_embeddings.weight" for n in state)


# ----------------------------------------------------------------------------- the trainer
from moetrain.checkpoint import load_model, load_run_config  # noqa: E402
from moetrain.config import (BalanceConfig, DataConfig, FinetuneConfig, LoggerConfig,  # noqa: E402
                             LoopConfig, ModelConfig, MoEConfig, OptimConfig, RunConfig,
                             WandbConfig)
from moetrain.train import Trainer  # noqa: E402

SHIFTED_TEXT = "\n\n".join(
    f"Chapter {i}. The lighthouse keeper counted {i * 7 % 13} ships and wrote {i % 5} letters "
    "to the harbour master, who never answered any of them." for i in range(400))


def tiny_cfg(tmp_path, name, steps, **overrides) -> RunConfig:
    cfg = RunConfig(
        run_dir=str(tmp_path / name),
        model=ModelConfig(vocab_size=256, dim=32, n_layers=2, n_heads=2, ffn_hidden=64,
                          max_seq_len=32, first_k_dense=1,
                          moe=MoEConfig(router="sigmoid", num_experts=8, top_k=2,
                                        expert_hidden=16, n_shared_experts=1),
                          balance=BalanceConfig(aux_free=True, aux_loss="sequence",
                                                aux_loss_coef=1e-3)),
        data=DataConfig(synthetic_docs=400, synthetic_val_docs=40, seq_len=32),
        optim=OptimConfig(lr=1e-2, warmup_steps=2),
        train=LoopConfig(steps=steps, micro_batch_size=4, log_every=2, val_every=0),
        logger=LoggerConfig(wandb=WandbConfig(mode="disabled"), progress_bar=False,
                            plots=False))
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def lora_cfg(tmp_path, base, name, steps=8, **lora):
    text = tmp_path / "shifted.txt"
    text.write_text(SHIFTED_TEXT)
    cfg = tiny_cfg(tmp_path, name, steps, init_from=str(base),
                   finetune=FinetuneConfig(LoRAConfig(
                       rank=4, alpha=8.0, targets=["experts", "shared_experts", "attention"],
                       **lora)))
    cfg.data = DataConfig(source="text", path=str(text), sample_by="paragraph", seq_len=32,
                          val_fraction=0.1)
    return cfg


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("base")
    trainer = Trainer(tiny_cfg(tmp, "base", steps=6))
    trainer.fit()
    return tmp / "base" / "checkpoints" / "step_00000006"


def test_lora_fine_tune_lowers_the_loss_on_shifted_data_with_the_base_untouched(
        tmp_path, base_checkpoint):
    base_model, _ = load_model(base_checkpoint)
    trainer = Trainer(lora_cfg(tmp_path, base_checkpoint, "lora", steps=10))
    before, _ = trainer.validate()
    trainer.fit()
    after, _ = trainer.validate()
    assert after < before - 0.2, (before, after)
    # frozen: bit-identical to the base; only adapters (and the expert bias buffer) moved
    state = trainer.model.state_dict()
    for key, value in base_model.state_dict().items():
        if not key.endswith("expert_bias"):
            assert torch.equal(state[key].cpu(), value.cpu()), key
    slots = {id(p) for p in trainer.optimizer.state}
    for name, p in trainer.model.named_parameters():
        assert (id(p) in slots) == name.endswith(("lora_A", "lora_B")), name

    # the checkpoint holds the adapters and buffers only, and names its base
    checkpoint = tmp_path / "lora" / "checkpoints" / "step_00000010"
    import torch.distributed.checkpoint as dcp
    saved = {k[len("model."):] for k in dcp.FileSystemReader(str(checkpoint)).read_metadata()
             .state_dict_metadata if k.startswith("model.")}
    assert saved == {k for k in state if k.endswith(("lora_A", "lora_B", "expert_bias"))}
    assert load_run_config(checkpoint).init_from == str(base_checkpoint.resolve())

    # loaded for evaluation: base + adapters, merged, with the LoRA model's logits
    merged, _ = load_model(checkpoint)
    assert not any(k.endswith(("lora_A", "lora_B")) for k in merged.state_dict())
    tokens = trainer.val_blocks[:4, :-1].to(next(merged.parameters()).device)
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model(tokens)[0]
        got = merged(tokens)[0]
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_a_resumed_lora_run_ends_where_an_uninterrupted_one_does(tmp_path, base_checkpoint):
    whole = Trainer(lora_cfg(tmp_path, base_checkpoint, "whole", steps=6))
    whole.fit()
    first = lora_cfg(tmp_path, base_checkpoint, "parts", steps=6)
    first.train.exit_at_step = 3
    Trainer(first).fit()
    second = lora_cfg(tmp_path, base_checkpoint, "parts", steps=6)
    second.resume = "auto"
    resumed = Trainer(second)
    assert resumed.step == 3
    resumed.fit()
    for key, value in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0,
                                   msg=key)


def test_lora_needs_a_base_and_valid_targets(tmp_path, base_checkpoint):
    cfg = lora_cfg(tmp_path, base_checkpoint, "bad")
    cfg.init_from = None
    with pytest.raises(ValueError, match=r"finetune.lora.rank=4 needs init_from"):
        cfg.validate(1)
    cfg = lora_cfg(tmp_path, base_checkpoint, "bad", )
    cfg.finetune.lora.targets = ["experts", "mlp"]
    with pytest.raises(ValueError, match=r"targets has 'mlp'; valid: experts, shared_experts"):
        cfg.validate(1)
    cfg.finetune.lora.targets = ["experts"]
    cfg.model.moe.n_shared_experts = 0
    cfg.finetune.lora.targets = ["shared_experts"]
    with pytest.raises(ValueError, match=r"has 'shared_experts' but this model has no shared"):
        cfg.validate(1)
    cfg.finetune.lora.targets = ["experts"]
    cfg.model.first_k_dense = cfg.model.n_layers  # a moe config, but every layer dense
    with pytest.raises(ValueError, match=r"has 'experts' but this model has no experts"):
        cfg.validate(1)


def test_a_lora_checkpoint_cannot_start_a_run(tmp_path, base_checkpoint):
    Trainer(lora_cfg(tmp_path, base_checkpoint, "first", steps=2)).fit()
    adapters = tmp_path / "first" / "checkpoints" / "step_00000002"
    with pytest.raises(ValueError, match=r"is itself a LoRA checkpoint; export it merged"):
        Trainer(lora_cfg(tmp_path, adapters, "second", steps=2))
    full = lora_cfg(tmp_path, adapters, "third", steps=2)  # a full fine-tune: the same line
    full.finetune.lora.rank = 0
    with pytest.raises(ValueError, match=r"is itself a LoRA checkpoint; export it merged"):
        Trainer(full)


def test_gathered_walk_with_adapters_and_dropout_matches_its_gradients(block_rows):
    experts = lora_experts(dropout=0.3)
    counts = [2, 3, 0, 1, 2]
    row_ids = torch.tensor([1, 4, 0, 1, 3, 2, 4, 0])
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(8, dtype=torch.float64, requires_grad=True)

    def seeded(a, g, *w):
        torch.manual_seed(3)
        return experts(a, torch.tensor(counts), g, row_ids=row_ids)

    assert torch.autograd.gradcheck(seeded, (x, gates, *experts.parameters()))
    experts.eval()
    rows = experts(x.index_select(0, row_ids), torch.tensor(counts), gates)
    want = torch.zeros(5, 8, dtype=torch.float64).index_add(0, row_ids, rows)
    torch.testing.assert_close(experts(x, torch.tensor(counts), gates, row_ids=row_ids),
                               want)


def test_a_lora_resume_refuses_another_base(tmp_path, base_checkpoint, capsys):
    first = lora_cfg(tmp_path, base_checkpoint, "adapters", steps=4)
    first.train.exit_at_step = 2
    Trainer(first).fit()
    other_run = tmp_path / "copy"
    shutil.copytree(base_checkpoint.parent.parent, other_run)  # the same base, elsewhere
    resumed = lora_cfg(tmp_path, other_run / "checkpoints" / base_checkpoint.name, "adapters",
                       steps=4)
    resumed.resume = "auto"
    with pytest.raises(ValueError, match=r"trained its adapters on init_from='.*/base/checkp"
                                         r".*', not on init_from='.*/copy/checkp.*'; resume"):
        Trainer(resumed)
    resumed = lora_cfg(tmp_path, base_checkpoint, "adapters", steps=4)
    resumed.resume, resumed.finetune.lora.alpha = "auto", 16.0
    assert Trainer(resumed).fit()["step"] == 4
    assert ("WARNING: finetune.lora.alpha=16.0 rescales adapters trained with alpha 8.0 "
            "(scaling 2 -> 4)") in capsys.readouterr().out
