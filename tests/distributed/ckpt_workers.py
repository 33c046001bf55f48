"""Trainer runs for the checkpoint tests: tiny models of both families on the generated corpus."""

from __future__ import annotations

import json
from pathlib import Path

from moetrain.config import (BalanceConfig, CheckpointConfig, DataConfig, LoggerConfig,
                             LoopConfig, ModelConfig, MoEConfig, OptimConfig, ParallelConfig,
                             RunConfig, WandbConfig)
from moetrain.train import Trainer
from tests.distributed.workers import gather_logical

GLOBAL_BATCH = 8


def model_config(family: str) -> ModelConfig:
    if family == "mixtral":
        return ModelConfig(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                           max_seq_len=16, moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=16),
                           balance=BalanceConfig(aux_loss="switch", z_loss_coef=1e-3))
    return ModelConfig(vocab_size=256, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=16,
                       ffn_hidden=64, first_k_dense=1,
                       moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=16, router="sigmoid",
                                     n_groups=2, topk_groups=1, n_shared_experts=1),
                       balance=BalanceConfig(aux_loss="sequence", aux_loss_coef=1e-3,
                                             aux_free=True, bias_update_rate=0.01))


def run_config(run_dir, family, world, ep, steps=10, data_parallel="fsdp", dp_replicate=1,
               **extra) -> RunConfig:
    train = dict(steps=steps, micro_batch_size=GLOBAL_BATCH // world, log_every=1, val_every=0)
    train.update(extra.pop("train", {}))
    return RunConfig(
        run_dir=str(run_dir), model=model_config(family),
        parallel=ParallelConfig(ep=ep, data_parallel=data_parallel, dp_replicate=dp_replicate),
        data=DataConfig(synthetic_docs=400, synthetic_val_docs=20, seq_len=16),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        train=LoopConfig(**train),
        checkpoint=CheckpointConfig(every=5, keep_last=0),
        logger=LoggerConfig(wandb=WandbConfig(mode="disabled"), progress_bar=False,
                            plots=False), **extra)


def train(rank, world, run_dir, family, ep, **kwargs) -> dict:
    trainer = Trainer(run_config(run_dir, family, world, ep, **kwargs))
    trainer.fit()
    state = gather_logical(trainer.model.state_dict())
    return {"step": trainer.step, "state": state}


def losses(run_dir) -> dict[int, float]:
    """step -> loss; a resumed run's later record of a step wins."""
    out = {}
    for line in open(Path(run_dir) / "metrics.jsonl"):
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def initial_state(rank, world, run_dir, family, ep, init_from, **kwargs) -> dict:
    """The logical weights a Trainer starts from (before any step), e.g. with init_from=hf:."""
    trainer = Trainer(run_config(run_dir, family, world, ep, init_from=init_from, **kwargs))
    return gather_logical(trainer.model.state_dict())
