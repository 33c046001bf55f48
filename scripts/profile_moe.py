"""Where does one MoE layer's time go beyond the matmuls? torch.profiler's per-op self time of
forward + backward, grouped by kind of work, for the MoE layer and the dense SwiGLU of the same
active FLOPs, measured in one run.

    .venv/bin/python scripts/profile_moe.py [--configs E64k8 E64k8s1 E8k2] [--tokens 4096]
        [--dim 512] [--steps 5] [--top 15]
    .venv/bin/python scripts/profile_moe.py --models mixtral_tiny deepseek_tiny  # whole steps

For each config: one table of milliseconds per forward + backward by kind (the dense layer's
beside it, and the difference: the MoE's overhead), then the MoE's top ops by self time. Kinds
are assigned by op name (KINDS below); an op that no kind names counts as "other", which also
holds the Python of the CPU expert walk (the self time of `_SwiGLUExpertsCPU[Backward]`).
Profiling adds a few microseconds per op, so the absolute times run above bench_moe.py's;
compare kinds, not totals, across scripts.

With --models, the same tables for whole training steps (forward, loss and backward, which is
almost all of a step: scripts/bench_train.py times the phases) of each shipped tiny MoE with its
shipped balance group, against dense_tiny. One model per run gives steadier figures: in one
process a model's large ops can run slower after another model's (glibc's heap state).

On CUDA the layers run in bf16 and the tables hold each op's self *device* time (its kernels),
with the wall time per forward + backward beside them: the gap between the two is launch and
host-sync latency, which no kernel time shows.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from moetrain.config import BalanceConfig
from moetrain.loss import next_token_loss
from moetrain.model.experts import SwiGLU
from moetrain.model.moe import MoE
from moetrain.model.transformer import Transformer
from moetrain.presets import bench_moe_layers, shipped_model

CONFIGS = bench_moe_layers()

KINDS = {
    "matmul": ("mm", "addmm", "addmm_", "bmm", "baddbmm", "_grouped_mm"),
    "elementwise": ("mul", "mul_", "add", "add_", "sub", "sub_", "div", "div_", "silu",
                    "silu_", "silu_backward", "sigmoid", "sigmoid_backward", "neg", "exp",
                    "rsub", "where", "clamp", "clamp_min"),
    "routing (top-k, sort, softmax, masks)": (
        "topk", "sort", "argsort", "_softmax", "_softmax_backward_data", "masked_fill",
        "masked_fill_", "scatter", "scatter_", "repeat_interleave", "arange", "eq", "lt",
        "ge"),
    # gather: the router's top-k scores, and on CUDA the row gathers (index_select runs as it)
    "row gather / scatter-add": ("index_select", "gather", "index_add", "index_add_", "index",
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


def self_us(event, cuda: bool = False) -> float:
    return event.self_device_time_total if cuda else event.self_cpu_time_total


def wall_ms(fn, steps: int, cuda: bool = False) -> float:
    """Milliseconds per call, unprofiled."""
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / steps


def profiled(fn, steps: int, cuda: bool = False):
    for _ in range(2):  # warm-up: allocator, first-call costs
        fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize()
    return prof.key_averages()


def by_kind(events, steps: int, cuda: bool = False) -> dict[str, float]:
    """Self milliseconds (CPU, or device on CUDA) per forward + backward, by kind."""
    totals: dict[str, float] = defaultdict(float)
    for event in op_events(events):
        totals[kind_of(event.key)] += self_us(event, cuda) / 1e3 / steps
    return totals


def op_events(events):
    """The ops: on CUDA the profile also lists each kernel as an event of its own, whose time
    its op's self device time already holds."""
    return [e for e in events if e.device_type == DeviceType.CPU]


def layer_steps(cfg, tokens: int, dim: int, device, dtype):
    """Forward + backward of the MoE layer and of the dense SwiGLU of the same active FLOPs."""
    moe = MoE(dim, cfg, BalanceConfig()).to(device)
    moe.init_weights(0.02)
    dense = SwiGLU(dim, (cfg.top_k + cfg.n_shared_experts) * cfg.expert_hidden).to(device)
    dense.init_weights(0.02)
    moe, dense = moe.to(dtype), dense.to(dtype)
    x = torch.randn(1, tokens, dim, device=device, dtype=dtype, requires_grad=True)

    def moe_step():  # fresh gradients, as after the trainer's zero_grad(set_to_none=True)
        moe.zero_grad(set_to_none=True)
        out, aux = moe(x)
        (out.sum() + aux).backward()

    def dense_step():
        dense.zero_grad(set_to_none=True)
        dense(x).sum().backward()
    return moe_step, dense_step


def model_step(name: str, batch: int, seq_len: int, device):
    """Forward, loss and backward of a shipped model with its shipped balance group (what a
    training step runs between data and optimizer) on random tokens; bf16 autocast on CUDA."""
    model = Transformer(shipped_model(name, with_balance=True)).to(device).train()
    tokens = torch.randint(0, model.cfg.vocab_size, (batch, seq_len + 1), device=device)

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda"):
            logits, aux = model(tokens[:, :-1])
        (next_token_loss(logits, tokens) + aux).backward()
    return step


def report(title: str, moe_step, dense_step, names: tuple[str, str], steps: int, top: int,
           cuda: bool, dense_events=None) -> None:
    """The table by kind of both steps' self time, the difference, and moe_step's top ops
    (dense_events: dense_step's profile when it was taken already)."""
    moe_events = profiled(moe_step, steps, cuda)
    if dense_events is None:
        dense_events = profiled(dense_step, steps, cuda)
    dense_kinds = by_kind(dense_events, steps, cuda)
    moe_kinds = by_kind(moe_events, steps, cuda)
    moe_name, dense_name = names
    print(f"\n{title}")
    print(f"{'kind':40s} {moe_name:>13s} {dense_name:>13s} {'difference':>12s}")
    kinds = sorted(set(moe_kinds) | set(dense_kinds), key=lambda k: -moe_kinds.get(k, 0))
    for kind in kinds:
        m, d = moe_kinds.get(kind, 0.0), dense_kinds.get(kind, 0.0)
        print(f"{kind:40s} {m:13.2f} {d:13.2f} {m - d:+12.2f}")
    m_total, d_total = sum(moe_kinds.values()), sum(dense_kinds.values())
    print(f"{'total':40s} {m_total:13.2f} {d_total:13.2f} {m_total - d_total:+12.2f}"
          f"   ({moe_name} / {dense_name} {m_total / d_total:.2f})")
    if cuda:
        m_wall, d_wall = wall_ms(moe_step, steps, cuda), wall_ms(dense_step, steps, cuda)
        print(f"{'wall time (unprofiled)':40s} {m_wall:13.2f} {d_wall:13.2f} "
              f"{m_wall - d_wall:+12.2f}   ({moe_name} / {dense_name} {m_wall / d_wall:.2f})")
    print(f"\ntop {top} {moe_name} ops by self time (ms per step, calls per step):")
    for event in sorted(op_events(moe_events), key=lambda e: -self_us(e, cuda))[:top]:
        print(f"  {event.key:50s} {self_us(event, cuda) / 1e3 / steps:9.3f}"
              f" {event.count / steps:8.0f}  {kind_of(event.key)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--models", nargs="+", choices=("mixtral_tiny", "deepseek_tiny"),
                        help="profile whole training steps of these shipped models instead, "
                             "each against dense_tiny (the same active compute)")
    parser.add_argument("--batch", type=int, default=16,
                        help="with --models: sequences per step (bench_train's micro-batch)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    where = (f"bf16 on {torch.cuda.get_device_name()}" if cuda
             else f"fp32, {torch.get_num_threads()} threads")
    unit = f"self {'device' if cuda else 'CPU'} time"
    torch.manual_seed(0)
    if args.models:
        dense_step = model_step("dense_tiny", args.batch, args.seq_len, device)
        dense_events = profiled(dense_step, args.steps, cuda)  # one baseline for every model
        for name in args.models:
            title = (f"{name} against dense_tiny: forward, loss and backward of "
                     f"{args.batch} x {args.seq_len} tokens, {where}; ms per step ({unit})")
            report(title, model_step(name, args.batch, args.seq_len, device), dense_step,
                   (name, "dense_tiny"), args.steps, args.top, cuda, dense_events)
        return
    for name in args.configs:
        cfg = CONFIGS[name]
        title = (f"{name}: {cfg.num_experts} experts of {cfg.expert_hidden}, top-{cfg.top_k}, "
                 f"{cfg.n_shared_experts} shared; {args.tokens} tokens x {args.dim}, {where}; "
                 f"ms per forward + backward ({unit})")
        moe_step, dense_step = layer_steps(cfg, args.tokens, args.dim, device, dtype)
        report(title, moe_step, dense_step, ("MoE", "dense"), args.steps, args.top, cuda)


if __name__ == "__main__":
    main()
