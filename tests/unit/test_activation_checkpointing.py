"""Activation checkpointing recomputes each block in backward: the same loss, gradients and
expert loads as keeping the activations, far fewer saved tensors, and tokens counted once."""

import copy
import dataclasses

import pytest
import torch

from moetrain.config import BalanceConfig, LoopConfig, MoEConfig
from moetrain.loss import next_token_loss
from moetrain.model import Transformer
from moetrain.model.balance import pop_step_loads
from tests.unit.test_transformer import FAMILIES

CASES = {
    "mixtral": FAMILIES["mixtral"],
    "deepseek": FAMILIES["deepseek"],
    # jitter draws random numbers in the router: the recomputation must draw the same ones
    "mixtral-jitter-capacity": dataclasses.replace(
        FAMILIES["mixtral"], moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=32,
                                           router_jitter=0.1, capacity_factor=1.0)),
    "expert_choice": dataclasses.replace(
        FAMILIES["mixtral"], moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=32,
                                           router="expert_choice", capacity_factor=1.0),
        balance=BalanceConfig(z_loss_coef=1e-3)),
}


def build(name: str, checkpointed: bool) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(copy.deepcopy(CASES[name]))
    model.checkpoint_activations(checkpointed)
    return model


def forward_backward(model, tokens, seed=1) -> torch.Tensor:
    torch.manual_seed(seed)
    logits, aux = model(tokens[:, :-1])
    loss = next_token_loss(logits, tokens)
    (loss + aux).backward()
    return (loss + aux).detach()


def count_moe_forwards(model) -> list[int]:
    calls = [0]
    for moe in model.moe_layers():
        moe.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("name", sorted(CASES))
def test_checkpointed_model_has_the_same_loss_gradients_and_loads(name):
    tokens = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(0))
    plain, ckpt = build(name, False), build(name, True)
    plain_calls, ckpt_calls = count_moe_forwards(plain), count_moe_forwards(ckpt)
    for _ in range(2):  # two micro-batches into one step's accumulators
        assert torch.equal(forward_backward(plain, tokens), forward_backward(ckpt, tokens))
    layers = len(plain.moe_layers())
    assert plain_calls[0] == 2 * layers and ckpt_calls[0] == 4 * layers  # really recomputed
    for (key, p), c in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(c.grad, p.grad, rtol=1e-6, atol=1e-9, msg=key)
    # counted once per micro-batch, not again by the recomputation
    assert torch.equal(pop_step_loads(ckpt.moe_layers()), pop_step_loads(plain.moe_layers()))
    for a, b in zip(plain.moe_layers(), ckpt.moe_layers()):
        for key, value in a.last_stats.items():
            torch.testing.assert_close(b.last_stats[key], value, msg=key)
        assert not b.recomputing


def saved_bytes(model, tokens) -> int:
    """Bytes autograd keeps between forward and backward (checkpointed blocks keep only
    their inputs; parameters are not activations and are skipped)."""
    params = {p.data_ptr() for p in model.parameters()}
    total = [0]

    def pack(t):
        if t.data_ptr() not in params:
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, aux = model(tokens[:, :-1])
    return total[0]


def test_checkpointing_cuts_saved_activations_and_eval_is_untouched():
    tokens = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(0))
    plain, ckpt = build("deepseek", False), build("deepseek", True)
    assert saved_bytes(ckpt, tokens) < 0.25 * saved_bytes(plain, tokens)
    calls = count_moe_forwards(ckpt)
    with torch.no_grad():  # no backward coming: nothing to checkpoint
        ckpt.eval()(tokens[:, :-1])
    assert calls[0] == len(ckpt.moe_layers())


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="train.activation_checkpointing='selective' is not "
                                         "one of none, full"):
        LoopConfig(activation_checkpointing="selective").validate()
