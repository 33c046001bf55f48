"""Where does one MoE layer's time go beyond the matmuls? torch.profiler's per-op self time of
forward + backward, grouped by kind of work, for the MoE layer and the dense SwiGLU of the same
active FLOPs, measured in one run.

    .venv/bin/python scripts/profile_moe.py [--configs E64k8 E64k8s1 E8k2] [--tokens 4096]
        [--dim 512] [--steps 5] [--top 15]

For each config: one table of milliseconds per forward + backward by kind (the dense layer's
beside it, and the difference: the MoE's overhead), then the MoE's top ops by self time. Kinds
are assigned by op name (KINDS below); an op that no kind names counts as "other", which also
holds the Python of the CPU expert walk (the self time of `_SwiGLUExpertsCPU[Backward]`).
Profiling adds a few microseconds per op, so the absolute times run above bench_moe.py's;
compare kinds, not totals, across scripts.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from moetrain.config import BalanceConfig
from moetrain.model.experts import SwiGLU
from moetrain.model.moe import MoE
from moetrain.presets import bench_moe_layers

CONFIGS = bench_moe_layers()

KINDS = {
    "matmul": ("mm", "addmm", "addmm_", "bmm", "baddbmm", "_grouped_mm"),
    "elementwise": ("mul", "mul_", "add", "add_", "sub", "sub_", "div", "div_", "silu",
                    "silu_", "silu_backward", "sigmoid", "sigmoid_backward", "neg", "exp",
                    "rsub", "where", "clamp", "clamp_min"),
    "routing (top-k, sort, softmax, masks)": (
        "topk", "sort", "argsort", "_softmax", "_softmax_backward_data", "masked_fill",
        "masked_fill_", "scatter", "scatter_", "repeat_interleave", "gather", "arange", "eq",
        "lt", "ge"),
    "row gather / scatter-add": ("index_select", "index_add", "index_add_", "index",
                                 "index_put_", "scatter_add", "scatter_add_",
                                 "index_select_backward"),
    "reductions and counts": ("sum", "mean", "bincount", "cumsum", "max", "amax",
                              "logsumexp", "histc"),
    "allocation and zero-fill": ("zeros", "zeros_like", "zero_", "fill_", "empty",
                                 "empty_like", "new_zeros", "new_empty", "empty_strided",
                                 "full"),
    "copies and casts": ("copy_", "clone", "contiguous", "_to_copy", "to", "cat", "stack"),
    "host syncs": ("item", "_local_scalar_dense", "tolist"),
}
KIND_OF = {name: kind for kind, names in KINDS.items() for name in names}


def kind_of(op: str) -> str:
    return KIND_OF.get(op.removeprefix("aten::"), "other")


def profiled(fn, steps: int):
    for _ in range(2):  # warm-up: allocator, first-call costs
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    return prof.key_averages()


def by_kind(events, steps: int) -> dict[str, float]:
    """Self CPU milliseconds per forward + backward, by kind."""
    totals: dict[str, float] = defaultdict(float)
    for event in events:
        totals[kind_of(event.key)] += event.self_cpu_time_total / 1e3 / steps
    return totals


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    for name in args.configs:
        cfg = CONFIGS[name]
        moe = MoE(args.dim, cfg, BalanceConfig())
        moe.init_weights(0.02)
        dense = SwiGLU(args.dim, (cfg.top_k + cfg.n_shared_experts) * cfg.expert_hidden)
        dense.init_weights(0.02)
        x = torch.randn(1, args.tokens, args.dim, requires_grad=True)

        def moe_step():
            out, aux = moe(x)
            (out.sum() + aux).backward()

        def dense_step():
            dense(x).sum().backward()

        moe_events = profiled(moe_step, args.steps)
        dense_kinds = by_kind(profiled(dense_step, args.steps), args.steps)
        moe_kinds = by_kind(moe_events, args.steps)
        print(f"\n{name}: {cfg.num_experts} experts of {cfg.expert_hidden}, top-{cfg.top_k}, "
              f"{cfg.n_shared_experts} shared; {args.tokens} tokens x {args.dim}, fp32, "
              f"{torch.get_num_threads()} threads; ms per forward + backward (self CPU time)")
        print(f"{'kind':40s} {'MoE':>9s} {'dense':>9s} {'MoE - dense':>12s}")
        kinds = sorted(set(moe_kinds) | set(dense_kinds), key=lambda k: -moe_kinds.get(k, 0))
        for kind in kinds:
            m, d = moe_kinds.get(kind, 0.0), dense_kinds.get(kind, 0.0)
            print(f"{kind:40s} {m:9.1f} {d:9.1f} {m - d:+12.1f}")
        m_total, d_total = sum(moe_kinds.values()), sum(dense_kinds.values())
        print(f"{'total':40s} {m_total:9.1f} {d_total:9.1f} {m_total - d_total:+12.1f}"
              f"   (MoE / dense {m_total / d_total:.2f})")
        print(f"\ntop {args.top} MoE ops by self time (ms per forward + backward, calls per "
              "forward + backward):")
        for event in sorted(moe_events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
            print(f"  {event.key:50s} {event.self_cpu_time_total / 1e3 / args.steps:9.1f}"
                  f" {event.count / args.steps:8.0f}  {kind_of(event.key)}")


if __name__ == "__main__":
    main()
