"""Activation checkpointing recomputes each block in backward: the same loss, gradients and
expert loads as keeping the activations, far fewer saved tensors, and tokens counted once."""

import copy

import pytest
import torch

from moetrain.config import LoopConfig
from moetrain.loss import next_token_loss
from moetrain.model import Transformer
from moetrain.model.balance import pop_step_loads
from moetrain.presets import tiny_deepseek, tiny_expert_choice, tiny_mixtral
from moetrain.probes import ForwardCounter, saved_activation_bytes

CASES = {
    "mixtral": tiny_mixtral(),
    "deepseek": tiny_deepseek(),
    # jitter draws random numbers in the router: the recomputation must draw the same ones
    "mixtral-jitter-capacity": tiny_mixtral(moe=dict(router_jitter=0.1, capacity_factor=1.0)),
    "expert_choice": tiny_expert_choice(),
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


@pytest.mark.parametrize("name", sorted(CASES))
def test_checkpointed_model_has_the_same_loss_gradients_and_loads(name):
    tokens = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(0))
    plain, ckpt = build(name, False), build(name, True)
    plain_moe, ckpt_moe = ForwardCounter(plain.moe_layers()), ForwardCounter(ckpt.moe_layers())
    for _ in range(2):  # two micro-batches into one step's accumulators
        assert torch.equal(forward_backward(plain, tokens), forward_backward(ckpt, tokens))
    layers = len(plain.moe_layers())
    assert plain_moe.calls == 2 * layers and ckpt_moe.calls == 4 * layers  # really recomputed
    for (key, p), c in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(c.grad, p.grad, rtol=1e-6, atol=1e-9, msg=key)
    # counted once per micro-batch, not again by the recomputation
    assert torch.equal(pop_step_loads(ckpt.moe_layers()), pop_step_loads(plain.moe_layers()))
    for a, b in zip(plain.moe_layers(), ckpt.moe_layers()):
        for key, value in a.last_stats.items():
            torch.testing.assert_close(b.last_stats[key], value, msg=key)
        assert not b.recomputing


def test_checkpointing_cuts_saved_activations_and_eval_is_untouched():
    tokens = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(0))
    plain, ckpt = build("deepseek", False), build("deepseek", True)

    def saved(model) -> int:
        return saved_activation_bytes(model, lambda: model(tokens[:, :-1]))

    assert saved(ckpt) < 0.25 * saved(plain)
    moe_forwards = ForwardCounter(ckpt.moe_layers())
    with torch.no_grad():  # no backward coming: nothing to checkpoint
        ckpt.eval()(tokens[:, :-1])
    assert moe_forwards.calls == len(ckpt.moe_layers())


def test_saved_bytes_count_each_storage_once_and_no_parameter():
    class ThreeProjections(torch.nn.Module):  # one input saved by three matmuls
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(3, 16, 16))

        def forward(self, x):
            return sum(x @ self.w[i] for i in range(3))  # views of the parameter saved too

    model, x = ThreeProjections(), torch.randn(10, 16)
    assert saved_activation_bytes(model, lambda: model(x)) == x.numel() * 4
    wide = torch.randn(10, 32)
    half = wide[:, :16]  # a view: its whole storage is what stays alive
    assert saved_activation_bytes(model, lambda: model(half)) == wide.numel() * 4


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="train.activation_checkpointing='selective' is not "
                                         "one of none, full"):
        LoopConfig(activation_checkpointing="selective").validate()


def test_compiled_blocks_stay_compiled_under_checkpointing(monkeypatch):
    """train.compile with activation checkpointing compiles what the checkpoint runs (Dynamo
    cannot trace into the checkpoint call itself, and compiling the block compiled nothing):
    graphs for every block, and the gradients of eager checkpointing. Dynamo's own tracing,
    with its eager backend here (inductor takes minutes on a CPU)."""
    import functools

    from torch._dynamo.utils import counters

    from moetrain.config import ParallelConfig
    from moetrain.parallel import parallelize
    # nn.Module.compile calls torch.compile too
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    eager = build("mixtral", checkpointed=True)
    compiled = parallelize(build("mixtral", checkpointed=False), None, ParallelConfig(),
                           compile=True, activation_checkpointing=True)
    for _ in range(2):  # the second step runs the graphs already compiled
        eager.zero_grad(set_to_none=True)
        compiled.zero_grad(set_to_none=True)
        torch.testing.assert_close(forward_backward(compiled, tokens),
                                   forward_backward(eager, tokens))
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(b.grad, a.grad, msg=name)
    # (the expert walk's host-side counts break each MoE block's graph in two, as without
    # checkpointing)
    assert counters["stats"]["unique_graphs"] >= len(compiled.layers)
    torch._dynamo.reset()
