"""LocalShardAdamW: torch's fused AdamW kernel on DTensor parameters' local shards, checked
against torch's AdamW on plain tensors (its per-tensor loop). One gloo rank in this process;
the sharded layouts (FSDP, expert parallelism, 2 and 4 ranks) train through it in
tests/distributed (resume, resharding, DDP against FSDP)."""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from moetrain.config import OptimConfig
from moetrain.optim import LocalShardAdamW, build_optimizer

from tests.distributed.launcher import free_port


@pytest.fixture
def mesh():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1, timeout=timedelta(seconds=60))
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def plain_and_sharded(mesh, seed=0):
    torch.manual_seed(seed)
    shapes = [(6, 4), (3, 5, 2), (7,)]
    plain = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    sharded = [torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)]))
               for p in plain]
    return plain, sharded


def groups(params):  # a decayed group, an undecayed one; the last parameter gets no gradient
    return [{"params": params[:2], "weight_decay": 0.1},
            {"params": params[2:], "weight_decay": 0.0}]


@pytest.mark.parametrize("grad_placement", [Shard(0), Replicate()])
def test_steps_equal_torch_adamw_and_keep_adamw_state(mesh, grad_placement):
    """Shard(0) gradients take the fused local path; a gradient sharded unlike its parameter
    (Replicate here) takes AdamW's own DTensor step. Both equal torch's AdamW."""
    plain, sharded = plain_and_sharded(mesh)
    reference = torch.optim.AdamW(groups(plain), lr=0.05, betas=(0.9, 0.95), eps=1e-8)
    ours = LocalShardAdamW(groups(sharded), lr=0.05, betas=(0.9, 0.95), eps=1e-8)
    for step in range(3):
        torch.manual_seed(100 + step)
        grads = [torch.randn(p.shape) for p in plain[:2]]
        for p, g in zip(plain[:2], grads):
            p.grad = g
        for p, g in zip(sharded[:2], grads):
            p.grad = distribute_tensor(g, mesh, [grad_placement])
        reference.step()
        assert ours.step(lambda: torch.tensor(float(step))) == step  # the closure's loss
    for p, q in zip(plain, sharded):
        torch.testing.assert_close(q.full_tensor(), p.detach(), rtol=1e-6, atol=1e-7)
    assert sharded[2] not in ours.state  # no gradient: no step, as AdamW
    for p, q in zip(plain[:2], sharded[:2]):
        state, ref_state = ours.state[q], reference.state[p]
        assert isinstance(state["exp_avg"], DTensor) and state["step"].item() == 3.0
        torch.testing.assert_close(state["exp_avg_sq"].full_tensor(), ref_state["exp_avg_sq"])


def test_build_optimizer_picks_the_fused_paths(mesh):
    plain, sharded = plain_and_sharded(mesh)
    model, dmodel = torch.nn.Module(), torch.nn.Module()
    for i, (p, q) in enumerate(zip(plain, sharded)):
        model.register_parameter(f"w{i}", p)
        dmodel.register_parameter(f"w{i}", q)
    opt, _ = build_optimizer(model, OptimConfig(), total_steps=10)
    assert type(opt) is torch.optim.AdamW and all(g["fused"] for g in opt.param_groups)
    opt, _ = build_optimizer(dmodel, OptimConfig(), total_steps=10)
    assert isinstance(opt, LocalShardAdamW)
