"""scripts/bench_moe.py: the matmuls-alone steps do exactly the matmul work of the layers they
stand for, so the split of each layer's time into matmuls and the rest is sound."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moetrain.config import BalanceConfig
from moetrain.model.experts import SwiGLU
from moetrain.model.moe import MoE

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_moe.py"
spec = importlib.util.spec_from_file_location("bench_moe", SCRIPT)
bench_moe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_moe)

aten = torch.ops.aten


class MatmulFlops(TorchDispatchMode):
    """2 * m * k * n of every mm / addmm(_) dispatched, forward and backward."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in (aten.mm, aten.addmm, aten.addmm_):
            a, b = args[:2] if packet is aten.mm else args[1:3]
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


def flops_of(step) -> int:
    with MatmulFlops() as counter:
        step()
    return counter.flops


@pytest.mark.parametrize("config", ["E8k2", "E32k6s2"])
def test_matmul_steps_do_the_layers_matmul_work(config):
    torch.manual_seed(0)
    cfg, dim, tokens = bench_moe.CONFIGS[config], 16, 96
    moe = MoE(dim, cfg, BalanceConfig())
    moe.init_weights(0.02)
    dense = SwiGLU(dim, (cfg.top_k + cfg.n_shared_experts) * cfg.expert_hidden)
    dense.init_weights(0.02)
    x = torch.randn(1, tokens, dim, requires_grad=True)
    steps = bench_moe.matmul_steps(moe, dense, x)

    layer = flops_of(bench_moe.fwd_bwd_step(lambda inp: moe(inp)[0], x, list(moe.parameters())))
    router = 3 * 2 * tokens * dim * cfg.num_experts  # logits, and their two gradients
    assert flops_of(steps["moe_matmuls"]) == layer - router
    assert flops_of(steps["dense_matmuls"]) == flops_of(
        bench_moe.fwd_bwd_step(dense, x, list(dense.parameters())))
    # equal active compute, by construction of the dense layer (every token keeps its k)
    assert flops_of(steps["moe_matmuls"]) == flops_of(steps["dense_matmuls"])


def test_a_tiny_run_prints_the_split(monkeypatch, capsys):
    import json
    monkeypatch.setattr(sys, "argv", ["bench_moe.py", "--configs", "E8k2", "--tokens", "64",
                                      "--dim", "16", "--repeats", "1", "--naive-tokens", "8"])
    bench_moe.main()
    result = json.loads(capsys.readouterr().out)
    assert result["moe_rest_ms"] == pytest.approx(result["moe_ms"] - result["moe_matmul_ms"],
                                                  abs=0.011)
    assert result["matmul_floor_vs_dense"] > 0 and result["naive_vs_moe"] > 0
