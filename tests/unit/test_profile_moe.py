"""scripts/profile_moe.py: every op's self time lands in exactly one kind, and a tiny layer
profiles end to end."""

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "profile_moe.py"
spec = importlib.util.spec_from_file_location("profile_moe", SCRIPT)
profile_moe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(profile_moe)


def test_op_names_map_to_kinds():
    assert profile_moe.kind_of("aten::mm") == "matmul"
    assert profile_moe.kind_of("aten::index_select") == "row gather / scatter-add"
    assert profile_moe.kind_of("aten::topk").startswith("routing")
    assert profile_moe.kind_of("_SwiGLUExpertsCPUBackward") == "other"
    names = [n for names in profile_moe.KINDS.values() for n in names]
    assert len(names) == len(set(names))  # no op is counted under two kinds


def test_kinds_add_up_to_the_profiled_self_time_and_a_tiny_layer_runs(monkeypatch, capsys):
    import torch
    x = torch.randn(64, 16, requires_grad=True)
    events = profile_moe.profiled(lambda: (x @ x.t()).sum().backward(), steps=2, cuda=False)
    kinds = profile_moe.by_kind(events, steps=2, cuda=False)
    total_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / 2
    assert abs(sum(kinds.values()) - total_ms) < 1e-6 * max(1.0, total_ms)
    assert kinds["matmul"] > 0
    monkeypatch.setattr(sys, "argv", ["profile_moe.py", "--configs", "E8k2", "--tokens", "64",
                                      "--dim", "32", "--steps", "1", "--top", "3"])
    profile_moe.main()
    out = capsys.readouterr().out
    assert "E8k2: 8 experts of 1024, top-2" in out and "(MoE / dense " in out
    assert "row gather / scatter-add" in out


def test_whole_steps_of_the_shipped_models_profile_against_dense_tiny(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["profile_moe.py", "--models", "deepseek_tiny", "--batch",
                                      "2", "--seq-len", "8", "--steps", "1", "--top", "40"])
    profile_moe.main()
    out = capsys.readouterr().out
    assert "deepseek_tiny against dense_tiny: forward, loss and backward of 2 x 8 tokens" in out
    assert "(deepseek_tiny / dense_tiny " in out
    top = out.split("ops by self time")[1]  # the MoE step's ops: the router and the walk
    assert "_SwiGLUExpertsCPUBackward" in top and "aten::topk" in top
