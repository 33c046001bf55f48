"""Benchmark one MoE layer (forward + backward) against equal-FLOP dense and loop references.

Prints one JSON line per config. All times of a line come from the same run, and the variants
are timed in turn within each repeat (MoE, dense, HF loop, MoE, dense, ...), so a change in
the machine's state over the run reaches all of them alike; each time is the median of the
repeats. The ratios:
  moe_vs_dense      our MoE layer / a dense SwiGLU of hidden (top_k + n_shared) * expert_hidden
  hf_loop_vs_dense  an HF-Mixtral-style loop over experts indexing stacked weights / dense
  naive_vs_moe      the per-token loop reference of the tests / our MoE layer
On the CPU, also the matmuls alone (`swiglu_matmuls`: the same matmuls at the same shapes,
nothing else), which split each layer's time into its matmuls and the rest:
  matmul_vs_dense        the MoE layer's matmuls / the dense layer's
  matmul_floor_vs_dense  the layer's ratio if all but its matmuls cost what the dense layer's
                         do: how far removing overhead alone can take moe_vs_dense
  moe_rest_ms, dense_rest_ms   each layer's time minus its matmuls'

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
from moetrain.model.moe import MoE, count_per_expert
from moetrain.presets import bench_moe_layers

CONFIGS = bench_moe_layers()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def fwd_bwd_step(fn, x, params=()):
    """One forward + backward of fn(x) as a zero-argument step. Fresh gradients, as after the
    trainer's zero_grad(set_to_none=True): otherwise backward adds into the last repeat's,
    which costs in proportion to *total* parameters (the MoE's are 8x the dense layer's at
    E=64) and is no part of a training step without accumulation."""
    def step():
        for p in (x, *params):
            p.grad = None
        out = fn(x)
        out.backward(torch.ones_like(out))
    return step


def time_interleaved(steps: dict, device, repeats, warmup=2) -> dict[str, float]:
    """Median seconds of each zero-argument step, the steps taking turns every repeat."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def swiglu_matmuls(ffns: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]):
    """A step of the matmuls alone of SwiGLU FFNs: for each (rows, w_gate (H, D), w_up (H, D),
    w_down (D, H)), the 3 forward and 6 backward matmuls that autograd runs for a dense SwiGLU
    and the CPU expert walk runs per expert (x W_gate^T, x W_up^T, h W_down^T; dy W_down,
    dy^T h, da^T x, db^T x, da W_gate + db W_up), on random rows laid out one FFN after the
    other as the walk's sorted rows are, into outputs allocated once. No gather, elementwise
    op, allocation or Python of the layer: what is left when everything but the FLOPs is
    free, with the matmul library's own efficiency at these shapes."""
    ffns = [f for f in ffns if f[0] > 0]
    rows = sum(f[0] for f in ffns)
    D = ffns[0][1].shape[1]
    hidden = max(f[1].shape[0] for f in ffns)
    like = ffns[0][1].detach()
    x, y, dy, dx = (like.new_empty(rows, D).normal_() for _ in range(4))
    a, b, h, dh, da, db = (like.new_empty(rows, hidden).normal_() for _ in range(6))
    grads = [[w.detach().new_empty(w.shape) for w in f[1:]] for f in ffns]
    spans, start = [], 0
    for n, *_ in ffns:
        spans.append(slice(start, start + n))
        start += n

    def step():
        for (_, w_gate, w_up, w_down), r in zip(ffns, spans):
            H = w_gate.shape[0]
            torch.mm(x[r], w_gate.detach().t(), out=a[r, :H])
            torch.mm(x[r], w_up.detach().t(), out=b[r, :H])
            torch.mm(h[r, :H], w_down.detach().t(), out=y[r])
        for (_, w_gate, w_up, w_down), r, (g_gate, g_up, g_down) in zip(ffns, spans, grads):
            H = w_gate.shape[0]
            torch.mm(dy[r], w_down.detach(), out=dh[r, :H])
            torch.mm(dy[r].t(), h[r, :H], out=g_down)
            torch.mm(da[r, :H].t(), x[r], out=g_gate)
            torch.mm(db[r, :H].t(), x[r], out=g_up)
            torch.mm(da[r, :H], w_gate.detach(), out=dx[r]).addmm_(db[r, :H], w_up.detach())
    return step


def matmul_steps(moe: MoE, dense: SwiGLU, x: torch.Tensor) -> dict:
    """The matmuls alone (`swiglu_matmuls`) of the MoE layer, each expert with the rows its
    router gives it on x (and the shared experts with every token), and of the dense layer."""
    x_flat = x.detach().view(-1, x.shape[-1])
    with torch.no_grad():
        counts = count_per_expert(moe.router(x_flat).expert_ids, moe.cfg.num_experts).tolist()
    ex, shared = moe.experts, moe.shared_experts
    ffns = [(n, ex.w_gate[e], ex.w_up[e], ex.w_down[e]) for e, n in enumerate(counts)]
    if shared is not None:
        ffns.append((x_flat.shape[0], shared.w_gate.weight, shared.w_up.weight,
                     shared.w_down.weight))
    return {"moe_matmuls": swiglu_matmuls(ffns),
            "dense_matmuls": swiglu_matmuls([(x_flat.shape[0], dense.w_gate.weight,
                                              dense.w_up.weight, dense.w_down.weight)])}


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

        steps = {"moe": fwd_bwd_step(lambda inp: moe(inp)[0], x, list(moe.parameters())),
                 "dense": fwd_bwd_step(dense, x, list(dense.parameters())),
                 "hf": fwd_bwd_step(lambda inp: hf_style_loop(moe, inp), x,
                                    list(moe.parameters()))}
        if device.type == "cpu":  # CUDA runs grouped matmuls, not the walk's per-expert ones
            steps.update(matmul_steps(moe, dense, x))
        times = time_interleaved(steps, device, args.repeats)
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
        if "moe_matmuls" in times:
            mm_moe, mm_dense = times["moe_matmuls"], times["dense_matmuls"]
            result.update({
                "moe_matmul_ms": round(1e3 * mm_moe, 2),
                "dense_matmul_ms": round(1e3 * mm_dense, 2),
                "matmul_vs_dense": round(mm_moe / mm_dense, 3),
                # the layer's ratio if everything but its matmuls cost what the dense layer's does
                "matmul_floor_vs_dense": round((mm_moe + t_dense - mm_dense) / t_dense, 3),
                "moe_rest_ms": round(1e3 * (t_moe - mm_moe), 2),
                "dense_rest_ms": round(1e3 * (t_dense - mm_dense), 2),
            })
        if args.naive_tokens:
            n = min(args.naive_tokens, args.tokens)
            x_naive = x[:, :n].detach().clone().requires_grad_(True)
            t_moe_n = time_interleaved({"moe": fwd_bwd_step(
                lambda inp: moe(inp)[0], x_naive, list(moe.parameters()))}, device, 1,
                warmup=1)["moe"]
            t_naive = time_interleaved({"naive": fwd_bwd_step(
                lambda inp: naive_token_loop(moe, inp), x_naive, list(moe.parameters()))},
                device, 1, warmup=0)["naive"]
            result.update({"naive_tokens": n, "naive_ms": round(1e3 * t_naive, 1),
                           "naive_vs_moe": round(t_naive / t_moe_n, 1)})
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
