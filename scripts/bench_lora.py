"""LoRA fine-tuning against full fine-tuning of the same model on the same tokens.

Prints one JSON line per model. Memory is counted, not sampled: trainable parameters, the
bytes of their gradients and of AdamW's state (exp_avg, exp_avg_sq, step) after a step. Speed:
median seconds per optimizer step (forward, backward, AdamW) over repeats that alternate
between the two set-ups, so both see the same machine state; tokens/s and the ratio come from
the same run.

    .venv/bin/python scripts/bench_lora.py                       # mixtral_tiny, deepseek_tiny
    .venv/bin/python scripts/bench_lora.py --models deepseek_small --rank 16 --batch 4
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from moetrain.config import LoRAConfig
from moetrain.loss import next_token_loss
from moetrain.model import Transformer
from moetrain.model.lora import apply_lora
from moetrain.train.cli import config_from_overrides


def build(model_cfg, lora: LoRAConfig | None, device):
    torch.manual_seed(0)
    model = Transformer(copy.deepcopy(model_cfg)).to(device)
    if lora is not None:
        apply_lora(model, lora)
        model.init_weights(0)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, torch.optim.AdamW(params, lr=1e-4)


def step(model, opt, tokens) -> float:
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    logits, aux = model(tokens[:, :-1])
    (next_token_loss(logits, tokens) + aux).backward()
    opt.step()
    if tokens.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def state_bytes(params, opt) -> dict[str, int]:
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    optim = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if torch.is_tensor(v))
    return {"trainable": sum(p.numel() for p in params), "grad_bytes": grads,
            "optimizer_bytes": optim}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["mixtral_tiny", "deepseek_tiny"])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--targets", nargs="*", default=["experts", "attention"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name in args.models:
        model_cfg = config_from_overrides([f"model={name}"]).model
        targets = [t for t in args.targets
                   if t != "shared_experts" or (model_cfg.moe and model_cfg.moe.n_shared_experts)]
        lora = LoRAConfig(rank=args.rank, alpha=args.alpha, targets=targets)
        tokens = torch.randint(0, model_cfg.vocab_size, (args.batch, args.seq + 1),
                               generator=torch.Generator().manual_seed(0)).to(device)
        runs = {"full": build(model_cfg, None, device), "lora": build(model_cfg, lora, device)}
        times = {kind: [] for kind in runs}
        for kind, (model, _, opt) in runs.items():  # warm-up, and AdamW state exists
            step(model, opt, tokens)
        for _ in range(args.repeats):
            for kind, (model, _, opt) in runs.items():
                times[kind].append(step(model, opt, tokens))
        result = {"model": name, "device": device.type, "threads": torch.get_num_threads(),
                  "tokens_per_step": args.batch * args.seq, "lora_rank": args.rank,
                  "lora_targets": targets,
                  "total_params": sum(p.numel() for p in runs["full"][0].parameters())}
        for kind, (model, params, opt) in runs.items():
            median = statistics.median(times[kind])
            result[kind] = {**state_bytes(params, opt), "step_s": round(median, 4),
                            "tokens_per_s": round(args.batch * args.seq / median)}
        full, lora_r = result["full"], result["lora"]
        result["lora_vs_full"] = {
            "trainable": round(lora_r["trainable"] / full["trainable"], 4),
            "optimizer_bytes": round(lora_r["optimizer_bytes"] / full["optimizer_bytes"], 4),
            "tokens_per_s": round(lora_r["tokens_per_s"] / full["tokens_per_s"], 3)}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
