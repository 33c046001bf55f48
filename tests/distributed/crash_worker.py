"""Run under torchrun by test_failures.py: trains a tiny EP model; one rank fails at step 2.

    python -m torch.distributed.run --nproc-per-node 2 crash_worker.py {raise|hang} TIMEOUT_S
"""

import sys
import time

import torch

from moetrain.config import ModelConfig, MoEConfig, ParallelConfig
from moetrain.loss import next_token_loss
from moetrain.model import Transformer
from moetrain.parallel import build_mesh, finalize_grads, init_distributed, parallelize


def main(mode: str, timeout_s: float) -> None:
    pcfg = ParallelConfig(ep=2, timeout_s=timeout_s)
    rank, _ = init_distributed(pcfg.timeout_s)
    cfg = ModelConfig(vocab_size=32, dim=16, n_layers=2, n_heads=2, max_seq_len=8,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=8))
    torch.manual_seed(0)
    model = Transformer(cfg)
    mesh = build_mesh(pcfg, cfg.moe.num_experts)
    module = parallelize(model, mesh, pcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(5):
        if step == 2 and rank == 1:
            if mode == "raise":
                raise RuntimeError("injected failure on rank 1")
            time.sleep(3600)  # a stuck rank: the others must give up after the group timeout
        tokens = torch.randint(0, 32, (2, 9))
        logits, aux = module(tokens[:, :-1])
        loss = next_token_loss(logits, tokens) + aux
        opt.zero_grad()
        loss.backward()
        finalize_grads(model, mesh)
        opt.step()
        print(f"rank {rank} step {step} loss {loss.item():.4f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
