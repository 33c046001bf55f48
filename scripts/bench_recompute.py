"""Benchmark activation checkpointing (train.activation_checkpointing=full) on a whole model.

Prints one JSON line per config, both runs measured in the same process:
  saved_activation_ratio   bytes autograd keeps from forward to backward, recompute / keep
  peak_memory_ratio        CUDA peak allocated memory of a step, recompute / keep (GPU only)
  step_time_ratio          forward + backward time, recompute / keep (expect ~1.3: one more
                           forward)

    .venv/bin/python scripts/bench_recompute.py       # fp32 on CPU, bf16 autocast on CUDA
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from moetrain.config import BalanceConfig, ModelConfig, MoEConfig
from moetrain.loss import next_token_loss
from moetrain.model import Transformer
from moetrain.probes import saved_activation_bytes

CONFIGS = {
    "mixtral-like": ModelConfig(
        vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, max_seq_len=512,
        moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=512),
        balance=BalanceConfig(aux_loss="switch")),
    "deepseek-like": ModelConfig(
        vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, max_seq_len=512,
        first_k_dense=1, ffn_hidden=1024,
        moe=MoEConfig(num_experts=32, top_k=8, expert_hidden=128, router="sigmoid", n_groups=4,
                      topk_groups=2, route_scale=2.5, n_shared_experts=1),
        balance=BalanceConfig(aux_loss="sequence", aux_free=True)),
}


def forward(model, tokens, device):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return model(tokens[:, :-1])


def step(model, tokens, device):
    logits, aux = forward(model, tokens, device)
    loss = next_token_loss(logits, tokens) + aux
    loss.backward()


def measure(cfg, recompute, tokens, device, repeats):
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    model.checkpoint_activations(recompute)
    saved = saved_activation_bytes(model, lambda: forward(model, tokens, device))
    times = []
    for i in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        step(model, tokens, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return saved, statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name, cfg in CONFIGS.items():
        tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
        keep = measure(cfg, False, tokens, device, args.repeats)
        recompute = measure(cfg, True, tokens, device, args.repeats)
        row = {"config": name, "device": device.type, "tokens": args.batch * args.seq,
               "saved_activation_mb_keep": round(keep[0] / 2**20, 1),
               "saved_activation_mb_recompute": round(recompute[0] / 2**20, 1),
               "saved_activation_ratio": round(recompute[0] / keep[0], 3),
               "step_time_ratio": round(recompute[1] / keep[1], 3)}
        if keep[2] is not None:
            row["peak_memory_ratio"] = round(recompute[2] / keep[2], 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
