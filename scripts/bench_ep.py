"""Expert-parallel MoE layer benchmark: weak scaling, all-to-all volume and communication share.

    launch/torchrun.sh is the usual way in; directly:
    .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 2 scripts/bench_ep.py

Prints one JSON line per (config, dedup) from rank 0, every figure measured in this run:
  world1_tokens_per_s   rank 0 alone, all experts local, the same per-rank batch and threads
  tokens_per_s          all ranks together, experts sharded over ep = world size
  weak_scaling_eff      tokens_per_s / (world * world1_tokens_per_s); 1.0 is perfect
  bytes_per_token       all-to-all payload per token per direction (dispatch; combine sends
                        the same rows back), with the floor of a non-dedup exchange beside it:
                        top_k * dim * element_size. remote_bytes_per_token counts only rows
                        that leave the rank.
  comm_share            share of step time inside all_to_all_single calls (waiting included)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from moetrain.config import BalanceConfig, ParallelConfig
from moetrain.model.moe import MoE
from moetrain.parallel import init_distributed
from moetrain.parallel.parallelize import apply_expert_parallel
from moetrain.presets import bench_moe_layers

CONFIGS = bench_moe_layers()


class CommTimer:
    """Wraps dist.all_to_all_single to add up the wall time spent inside it."""

    def __init__(self):
        self.seconds = 0.0
        self._original = dist.all_to_all_single

    def __enter__(self):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self._original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        dist.all_to_all_single = timed
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self._original


def step(moe, x):
    x.grad = None
    out, _ = moe(x)
    out.backward(torch.ones_like(out))


def timed_steps(moe, x, repeats, warmup=2, group=None):
    times, comm = [], []
    for i in range(warmup + repeats):
        if group is not None:
            dist.barrier(group=group)
        with CommTimer() as timer:
            start = time.perf_counter()
            step(moe, x)
            elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
            comm.append(timer.seconds)
    return statistics.median(times), statistics.median(comm)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--configs", nargs="*", default=sorted(CONFIGS))
    args = parser.parse_args()
    rank, world = init_distributed(timeout_s=600)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    group = dist.group.WORLD
    ep_mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("ep",))
    for name in args.configs:
        cfg = CONFIGS[name]
        ParallelConfig(ep=world).validate(world, cfg.num_experts)
        torch.manual_seed(0)
        full = MoE(args.dim, cfg, BalanceConfig()).to(device)
        full.init_weights(0.02)
        full = full.to(dtype)
        torch.manual_seed(1 + rank)  # every rank reads different data
        x = torch.randn(1, args.tokens, args.dim, device=device, dtype=dtype,
                        requires_grad=True)

        t_world1 = None
        if rank == 0:  # the world-1 baseline: same per-rank batch, same threads, no comm
            t_world1, _ = timed_steps(full, x, args.repeats)
        dist.barrier()
        for dedup in (False, True):
            moe = MoE(args.dim, cfg, BalanceConfig()).to(device).to(dtype)
            moe.load_state_dict(full.state_dict())
            apply_expert_parallel([moe], ep_mesh, dedup)
            t_step, t_comm = timed_steps(moe, x, args.repeats, group=group)
            sent = moe.dispatcher.last_sent
            row_bytes = args.dim * x.element_size()
            meta_bytes = 4 + 2 * 4  # fp32 gate weight + two int32 indices per assignment
            payload = sum(sent["rows"]) * row_bytes + sum(sent["assignments"]) * meta_bytes
            remote = payload - sent["rows"][rank] * row_bytes \
                - sent["assignments"][rank] * meta_bytes
            stats = torch.tensor([t_step, t_comm, payload, remote], dtype=torch.float64)
            dist.all_reduce(stats)  # averages over ranks
            t_step, t_comm, payload, remote = (stats / world).tolist()
            if rank == 0:
                tokens_per_s = world * args.tokens / t_step
                world1_tokens_per_s = args.tokens / t_world1
                print(json.dumps({
                    "config": name, "world": world, "ep": world, "dedup": dedup,
                    "device": device.type, "dtype": str(dtype).removeprefix("torch."),
                    "threads_per_rank": torch.get_num_threads(),
                    "tokens_per_rank": args.tokens, "dim": args.dim,
                    "num_experts": cfg.num_experts, "top_k": cfg.top_k,
                    "world1_tokens_per_s": round(world1_tokens_per_s),
                    "tokens_per_s": round(tokens_per_s),
                    "weak_scaling_eff": round(tokens_per_s / (world * world1_tokens_per_s), 3),
                    "bytes_per_token": round(payload / args.tokens),
                    "remote_bytes_per_token": round(remote / args.tokens),
                    "floor_bytes_per_token_no_dedup": cfg.top_k * row_bytes,
                    "comm_share": round(t_comm / t_step, 3),
                }), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
