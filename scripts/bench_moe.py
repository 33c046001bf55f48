"""Benchmark one MoE layer (forward + backward) against equal-FLOP dense and loop references.

Prints one JSON line per config. All times of a line come from the same run, and the variants
are timed in turn within each repeat (MoE, dense, HF loop, MoE, dense, ...), so a change in
the machine's state over the run reaches all of them alike; each time is the median of the
repeats. The ratios:
  moe_vs_dense      our MoE layer / a dense SwiGLU of hidden (top_k + n_shared) * expert_hidden
  hf_loop_vs_dense  an HF-Mixtral-style loop over experts indexing stacked weights / dense
  naive_vs_moe      the per-token loop reference of the tests / our MoE layer

    .venv/bin/python scripts/bench_moe.py            # fp32 on CPU, bf16 on CUDA
    .venv/bin/python scripts/bench_moe.py --naive-tokens 0   # skip the slow per-token loop
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from moetrain.config import BalanceConfig
from moetrain.model.experts import SwiGLU
from moetrain.model.moe import MoE
from moetrain.presets import bench_moe_layers

CONFIGS = bench_moe_layers()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def fwd_bwd_seconds(fn, x, device, params=()) -> float:
    # Fresh gradients, as after the trainer's zero_grad(set_to_none=True): otherwise backward
    # adds into the last repeat's, which costs in proportion to *total* parameters (the MoE's
    # are 8x the dense layer's at E=64) and is no part of a training step without accumulation.
    for p in (x, *params):
        p.grad = None
    sync(device)
    start = time.perf_counter()
    out = fn(x)
    out.backward(torch.ones_like(out))
    sync(device)
    return time.perf_counter() - start


def time_fwd_bwd(fn, x, device, repeats, warmup=2, params=()):
    return time_interleaved({"fn": fn}, x, device, repeats, warmup, {"fn": params})["fn"]


def time_interleaved(fns: dict, x, device, repeats, warmup=2, params=None
                     ) -> dict[str, float]:
    """Median seconds of forward + backward of each fn, the fns taking turns every repeat;
    params[name]: the parameters whose gradients are reset before each of fn's calls."""
    params = {name: list(params.get(name, ())) if params else [] for name in fns}
    for name, fn in fns.items():
        for _ in range(warmup):
            fwd_bwd_seconds(fn, x, device, params[name])
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(fwd_bwd_seconds(fn, x, device, params[name]))
    return {name: statistics.median(values) for name, values in times.items()}


def hf_style_loop(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The HF Mixtral block's algorithm over stacked weights: a mask and an index per expert."""
    x_flat = x.view(-1, x.shape[-1])
    route = moe.router(x_flat)
    k = route.top_k
    topk_ids, topk_w = route.expert_ids.view(-1, k), route.weights.view(-1, k)
    out = torch.zeros_like(x_flat)
    ex = moe.experts
    for e in range(moe.cfg.num_experts):
        token_idx, slot = torch.where(topk_ids == e)
        if token_idx.numel() == 0:
            continue
        h = x_flat[token_idx]
        h = (F.silu(h @ ex.w_gate[e].t()) * (h @ ex.w_up[e].t())) @ ex.w_down[e].t()
        out = out.index_add(0, token_idx, h * topk_w[token_idx, slot, None].to(h.dtype))
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(x_flat)
    return out.view_as(x)


def naive_token_loop(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The per-token reference: out[t] = shared(x[t]) + sum_i g_i * FFN_i(x[t])."""
    x_flat = x.view(-1, x.shape[-1])
    route = moe.router(x_flat)
    k = route.top_k
    ids, w = route.expert_ids.view(-1, k).tolist(), route.weights.view(-1, k)
    ex = moe.experts
    rows = []
    for t in range(x_flat.shape[0]):
        xt = x_flat[t]
        acc = moe.shared_experts(xt) if moe.shared_experts is not None else torch.zeros_like(xt)
        for j, e in enumerate(ids[t]):
            h = F.silu(ex.w_gate[e] @ xt) * (ex.w_up[e] @ xt)
            acc = acc + w[t, j].to(xt.dtype) * (ex.w_down[e] @ h)
        rows.append(acc)
    return torch.stack(rows).view_as(x)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--naive-tokens", type=int, default=256,
                        help="tokens for the per-token loop, and for the MoE run it is compared "
                             "with (0 skips it; the loop is slow)")
    parser.add_argument("--configs", nargs="*", default=sorted(CONFIGS))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    for name in args.configs:
        cfg = CONFIGS[name]
        moe = MoE(args.dim, cfg, BalanceConfig()).to(device)
        moe.init_weights(0.02)
        dense_hidden = (cfg.top_k + cfg.n_shared_experts) * cfg.expert_hidden
        dense = SwiGLU(args.dim, dense_hidden).to(device)
        dense.init_weights(0.02)
        moe, dense = moe.to(dtype), dense.to(dtype)
        x = torch.randn(1, args.tokens, args.dim, device=device, dtype=dtype, requires_grad=True)

        times = time_interleaved({"moe": lambda inp: moe(inp)[0], "dense": dense,
                                  "hf": lambda inp: hf_style_loop(moe, inp)},
                                 x, device, args.repeats,
                                 params={"moe": moe.parameters(), "dense": dense.parameters(),
                                         "hf": moe.parameters()})
        t_moe, t_dense, t_hf = times["moe"], times["dense"], times["hf"]
        result = {
            "config": name, "device": device.type, "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(), "tokens": args.tokens, "dim": args.dim,
            "num_experts": cfg.num_experts, "top_k": cfg.top_k,
            "expert_hidden": cfg.expert_hidden, "n_shared": cfg.n_shared_experts,
            "dense_hidden": dense_hidden,
            "moe_ms": round(1e3 * t_moe, 2), "dense_ms": round(1e3 * t_dense, 2),
            "hf_loop_ms": round(1e3 * t_hf, 2),
            "moe_vs_dense": round(t_moe / t_dense, 3),
            "hf_loop_vs_dense": round(t_hf / t_dense, 3),
        }
        if args.naive_tokens:
            n = min(args.naive_tokens, args.tokens)
            x_naive = x[:, :n].detach().clone().requires_grad_(True)
            t_moe_n = time_fwd_bwd(lambda inp: moe(inp)[0], x_naive, device, 1, warmup=1,
                                   params=list(moe.parameters()))
            t_naive = time_fwd_bwd(lambda inp: naive_token_loop(moe, inp), x_naive, device, 1,
                                   warmup=0, params=list(moe.parameters()))
            result.update({"naive_tokens": n, "naive_ms": round(1e3 * t_naive, 1),
                           "naive_vs_moe": round(t_naive / t_moe_n, 1)})
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
