"""Memory per rank of each data/expert-parallel layout, and FSDP's speed against DDP's.

    .venv/bin/python scripts/bench_memory.py [--model deepseek_small] [--worlds 1 2 4]

For every layout (world 1; world 2 and 4 with DDP and FSDP, ep = 1, 2, world) it starts the
ranks (gloo on CPU, NCCL on GPUs), builds the model the way the trainer does (meta device,
parallelize, materialise this rank's shards) and trains a few steps on random tokens. Per rank,
the largest over ranks:
  state    bytes of this rank's parameters + gradients + AdamW state after a step
  built    resident memory added by building and initialising the model (CUDA: allocated)
  peak     the high-water mark of resident memory over building and training (CUDA: allocated)
With --allocator exact (the default) the ranks fix glibc's mmap threshold at 64 KiB
(MALLOC_MMAP_THRESHOLD_), so freed tensors go back to the OS and resident memory follows the
live tensors: otherwise the heaps of gloo's threads keep freed blocks and resident memory grows
with every collective's buffers. That costs speed: take tokens/s from --allocator default.
  tok/s    tokens per second of all ranks together, median over the timed steps
Ratios are to world 1 in the same run. Every figure is measured, none estimated.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from moetrain.config import ParallelConfig
from moetrain.loss import next_token_loss
from moetrain.model import Transformer
from moetrain.parallel import (accumulating, build_mesh, clip_grad_norm_, finalize_grads,
                               init_distributed, parallelize)
from moetrain.parallel.memory import (format_bytes, peak_resident_bytes, reset_peak_resident,
                                      resident_bytes)
from moetrain.presets import shipped_model


def local_bytes(tensors) -> int:
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


class Memory:
    """Resident memory on CPU, the caching allocator's count on CUDA."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def reset(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        reset_peak_resident()
        return resident_bytes()

    def now(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else resident_bytes()

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else peak_resident_bytes()


def measure(rank: int, world: int, model_name: str, pcfg: ParallelConfig, steps: int,
            micro_batch: int, seq_len: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # one thread per rank at every world size, as torchrun does
    init_distributed(timeout_s=600)
    device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
              else torch.device("cpu"))
    cfg = shipped_model(model_name)
    mesh = build_mesh(pcfg, cfg.moe.num_experts)
    with torch.device("meta"):  # one-time lazy set-up of meta kernels, not the model's memory
        Transformer(cfg)
    gc.collect()
    memory = Memory(device)
    base = memory.reset()
    with torch.device("meta"):
        model = Transformer(cfg)
    # bf16 on CUDA as the trainer does: FSDP's policy, else autocast (one process, DDP)
    fsdp_bf16 = device.type == "cuda" and world > 1 and pcfg.data_parallel == "fsdp"
    autocast = device.type == "cuda" and not fsdp_bf16
    module = parallelize(model, mesh, pcfg, device=device, seed=0, mixed_precision=fsdp_bf16)
    built = memory.now() - base
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(rank)
    times = []
    for step in range(steps):
        tokens = torch.randint(0, cfg.vocab_size, (2 * micro_batch, seq_len + 1),
                               generator=generator).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        for i, micro in enumerate(tokens.chunk(2)):  # two micro-batches: accumulation too
            with accumulating(module, pcfg.fsdp_defer_sync) if i == 0 \
                    else contextlib.nullcontext():
                with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
                    logits, aux = module(micro[:, :-1])
                ((next_token_loss(logits, micro) + aux) / 2).backward()
        finalize_grads(model, mesh)
        clip_grad_norm_(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradients to count them
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        times.append(time.perf_counter() - start)
    state = (local_bytes(model.parameters())
             + local_bytes(p.grad for p in model.parameters() if p.grad is not None)
             + local_bytes(v for s in optimizer.state.values() for v in s.values()
                           if torch.is_tensor(v) and v.ndim > 0))
    timed = times[1:] if len(times) > 1 else times
    tokens_per_s = world * 2 * micro_batch * seq_len / statistics.median(timed)
    figures = torch.tensor([state, built, memory.peak() - base, tokens_per_s],
                           dtype=torch.float64)
    gathered = [torch.zeros_like(figures) for _ in range(world)]
    dist.all_gather(gathered, figures)
    if rank == 0:
        torch.save(torch.stack(gathered), Path(out_dir) / "figures.pt")
    dist.destroy_process_group()


def run_layout(world: int, pcfg: ParallelConfig, args) -> dict:
    with tempfile.TemporaryDirectory() as out_dir:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        if args.allocator == "exact":
            os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
        else:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        mp.spawn(measure, args=(world, args.model, pcfg, args.steps, args.micro_batch,
                                args.seq_len, out_dir), nprocs=world, join=True)
        per_rank = torch.load(Path(out_dir) / "figures.pt")
    state, built, peak = per_rank[:, :3].max(dim=0).values.tolist()
    return {"state": state, "built": built, "peak": peak,
            "tokens_per_s": per_rank[0, 3].item()}


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deepseek_small", help="a configs/model/ name")
    parser.add_argument("--worlds", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=4, help="the first is not timed")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--allocator", choices=("exact", "default"), default="exact",
                        help="exact: memory figures follow live tensors (slower); default: "
                             "glibc's usual allocator, for tokens/s")
    parser.add_argument("--fsdp-defer-sync", action="store_true",
                        help="FSDP keeps parameters and gradients unsharded between the two "
                             "micro-batches (parallel.fsdp_defer_sync)")
    args = parser.parse_args()
    cfg = shipped_model(args.model)
    with torch.device("meta"):
        total = sum(p.numel() for p in Transformer(cfg).parameters())
    print(f"model={args.model}: {total / 1e6:.1f}M parameters; per rank 2 micro-batches of "
          f"{args.micro_batch} x {args.seq_len} tokens per step; figures are the largest over "
          f"ranks; allocator {args.allocator}"
          + ("; fsdp_defer_sync" if args.fsdp_defer_sync else ""), flush=True)
    layouts = []
    for world in args.worlds:
        if world == 1:
            layouts.append((1, ParallelConfig()))
            continue
        for data_parallel in ("ddp", "fsdp"):
            for ep in sorted({1, 2, world}):
                layouts.append((world, ParallelConfig(
                    ep=ep, data_parallel=data_parallel, fsdp_defer_sync=args.fsdp_defer_sync)))
    base = None
    header = (f"{'layout':<24}{'state/rank':>12}{'ratio':>7}{'built':>12}{'ratio':>7}"
              f"{'peak':>12}{'ratio':>7}{'tokens/s':>10}")
    print(header)
    for world, pcfg in layouts:
        result = run_layout(world, pcfg, args)
        base = base or result
        name = ("world 1" if world == 1 else
                f"w{world} {pcfg.data_parallel} ep{pcfg.ep} edp{world // pcfg.ep}")
        print(f"{name:<24}"
              + "".join(f"{format_bytes(result[k]):>12}{result[k] / base[k]:>7.2f}"
                        for k in ("state", "built", "peak"))
              + f"{result['tokens_per_s']:>10.0f}", flush=True)


if __name__ == "__main__":
    main()
