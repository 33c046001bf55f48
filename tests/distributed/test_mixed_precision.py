"""FSDP's bf16 mixed precision (param_dtype bf16, fp32 reduction) on every expert layout.

With one replica per expert shard (ep = world) the experts are not FSDP's, so no policy casts
them: the walk computes in the rows' dtype itself. The same batch through ep=1 (experts
FSDP-sharded and cast) and ep=2 must give the same loss and gradients to bf16 precision, and
both stay near the fp32 model's."""

from __future__ import annotations

import copy

import torch

from moetrain.config import ParallelConfig
from moetrain.model import Transformer
from moetrain.parallel import build_mesh, parallelize
from moetrain.parallel.grads import finalize_grads
from tests.distributed import workers as W
from tests.distributed.launcher import run_distributed


def bf16_step(rank, world_size, layouts):
    out = {}
    for ep, mixed in layouts:
        cfg = W.family("deepseek")
        pcfg = ParallelConfig(ep=ep)
        mesh = build_mesh(pcfg, cfg.moe.num_experts)
        with torch.device("meta"):
            model = Transformer(copy.deepcopy(cfg))
        module = parallelize(model, mesh, pcfg, seed=W.SEED, mixed_precision=mixed)
        per_rank = W.GLOBAL_BATCH // world_size
        loss = W.lm_loss(module, W.global_batch()[rank * per_rank:(rank + 1) * per_rank])
        loss.backward()
        finalize_grads(model, mesh)  # averages what FSDP does not (experts at ep = world)
        grads = W.gather_logical({n: p.grad for n, p in model.named_parameters()
                                  if p.grad is not None})
        out[(ep, mixed)] = (loss.item(), {n: g.float() for n, g in grads.items()})
    return out


def test_bf16_experts_left_out_of_fsdp_compute_like_the_sharded_ones():
    results = run_distributed(bf16_step, 2, [(1, True), (2, True), (1, False)])
    for rank_result in results:
        (loss_1, grads_1), (loss_2, grads_2), (loss_fp32, _) = (
            rank_result[key] for key in [(1, True), (2, True), (1, False)])
        assert abs(loss_1 - loss_2) < 1e-2 * abs(loss_1)
        assert abs(loss_1 - loss_fp32) < 3e-2 * abs(loss_fp32)
        assert grads_1.keys() == grads_2.keys()
        experts = [n for n in grads_1 if ".experts." in n]
        assert experts
        for name in grads_1:
            a, b = grads_1[name], grads_2[name]
            assert torch.isfinite(b).all(), name
            assert (a - b).norm() <= 0.05 * a.norm() + 1e-6, name
