"""What the ranks run in the distributed tests, and the single-process references they match."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moetrain.config import BalanceConfig, ModelConfig, MoEConfig, ParallelConfig
from moetrain.model import Transformer
from moetrain.model.balance import pop_step_loads, update_expert_bias
from moetrain.parallel import (all_reduce_sum, build_mesh, clip_grad_norm_, finalize_grads,
                               parallelize)

STEPS, LR, EPS, CLIP, GLOBAL_BATCH, SEQ = 5, 1e-3, 1e-6, 0.5, 8, 16


def family(name: str, capacity_factor=None) -> ModelConfig:
    if name == "expert_choice":  # a variable number of experts per token through the exchange
        return ModelConfig(
            vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=SEQ,
            moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=16, router="expert_choice",
                          capacity_factor=capacity_factor),
            balance=BalanceConfig(z_loss_coef=1e-3))
    if name.startswith("mixtral"):
        stats = "global_batch" if name == "mixtral_global" else "micro_batch"
        return ModelConfig(
            vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=SEQ,
            moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=16,
                          capacity_factor=capacity_factor),
            balance=BalanceConfig(aux_loss="switch", aux_loss_coef=0.1, aux_loss_stats=stats,
                                  z_loss_coef=1e-3))
    return ModelConfig(
        vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=SEQ,
        first_k_dense=1, ffn_hidden=48,
        moe=MoEConfig(num_experts=16, top_k=4, expert_hidden=8, router="sigmoid", n_groups=4,
                      topk_groups=2, route_scale=2.5, n_shared_experts=1,
                      capacity_factor=capacity_factor),
        balance=BalanceConfig(aux_loss="sequence", aux_loss_coef=0.01, aux_free=True,
                              bias_update_rate=0.01))


def global_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, 64, (GLOBAL_BATCH, SEQ + 1), generator=g)


def lm_loss(module, tokens):
    logits, aux = module(tokens[:, :-1])
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    return ce + aux


def layer_counts(model) -> torch.Tensor:
    return torch.stack([m.last_stats["tokens_per_expert"].float() for m in model.moe_layers()])


def layer_dropped(model) -> float:
    return max(m.last_stats["dropped_fraction"].item() for m in model.moe_layers())


def reference_run(cfg: ModelConfig, micro_batches: int, steps: int = STEPS) -> dict:
    """One process, the global batch as `micro_batches` equal micro-batches (one per rank).
    One thread, like each rank: matmul results can differ in the last bit with thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference_run(cfg, micro_batches, steps)
    finally:
        torch.set_num_threads(threads)


def _reference_run(cfg: ModelConfig, micro_batches: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = Transformer(copy.deepcopy(cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    batch = global_batch()
    losses, counts, dropped, norms = [], [], [], []
    for step in range(steps):
        opt.zero_grad()
        total, step_counts = 0.0, 0
        for micro in batch.chunk(micro_batches):
            loss = lm_loss(model, micro) / micro_batches
            loss.backward()
            total += loss.item()
            step_counts = step_counts + layer_counts(model)
            dropped.append(layer_dropped(model))
        if step == 0:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        if cfg.balance.aux_free:
            update_expert_bias(model.moe_layers(), pop_step_loads(model.moe_layers()),
                               cfg.balance.bias_update_rate)
        losses.append(total)
        counts.append(step_counts)
    return {"losses": losses, "counts": torch.stack(counts), "max_dropped": max(dropped),
            "grad_norms": norms, "first_grads": first_grads,
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


_MESHES = {}


def parallel_run(rank: int, world_size: int, cfg: ModelConfig, pcfg: ParallelConfig,
                 steps: int = STEPS, recompute: bool = False) -> dict:
    torch.manual_seed(0)
    model = Transformer(copy.deepcopy(cfg))
    model.checkpoint_activations(recompute)
    moe_forwards = [0]  # twice per step and layer when the backward recomputes
    for moe in model.moe_layers():
        moe.register_forward_hook(lambda *_: moe_forwards.__setitem__(0, moe_forwards[0] + 1))
    if pcfg.ep not in _MESHES:
        _MESHES[pcfg.ep] = build_mesh(pcfg, cfg.moe.num_experts)
    mesh = _MESHES[pcfg.ep]
    module = parallelize(model, mesh, pcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    per_rank = GLOBAL_BATCH // world_size
    tokens = global_batch()[rank * per_rank:(rank + 1) * per_rank]
    reduce = all_reduce_sum(dist.group.WORLD)
    losses, counts, norms = [], [], []
    for step in range(steps):
        opt.zero_grad()
        loss = lm_loss(module, tokens)
        loss.backward()
        finalize_grads(model, mesh)
        if step == 0:
            first_grads = gather_logical({n: p.grad for n, p in model.named_parameters()}, mesh)
        norms.append(clip_grad_norm_(model, CLIP, mesh).item())
        opt.step()
        if cfg.balance.aux_free:
            loads = pop_step_loads(model.moe_layers(), reduce)
            update_expert_bias(model.moe_layers(), loads, cfg.balance.bias_update_rate)
        losses.append(reduce(loss.detach()).item() / world_size)
        counts.append(reduce(layer_counts(model)))
    return {"losses": losses, "counts": torch.stack(counts), "grad_norms": norms,
            "first_grads": first_grads, "state": gather_logical(model.state_dict(), mesh),
            "moe_forwards": moe_forwards[0] / (steps * len(model.moe_layers())),
            "expert_bias": [m.router.expert_bias.clone() for m in model.moe_layers()
                            if hasattr(m.router, "expert_bias")]}


def gather_logical(tensors: dict, mesh) -> dict:
    """The logical (unsharded) view: expert shards all-gathered over the ep group."""
    ep = mesh["ep"].size()
    state = {}
    for name, value in tensors.items():
        value = value.detach()
        if ".experts." in name and ep > 1:
            parts = [torch.empty_like(value) for _ in range(ep)]
            dist.all_gather(parts, value.contiguous(), group=mesh["ep"].get_group())
            value = torch.cat(parts)
        state[name] = value.clone()
    return state


def run_cases(rank: int, world_size: int, cases: list[tuple], steps: int = STEPS) -> list[dict]:
    """cases: (family name, capacity factor, ep, dedup, activation checkpointing) -> one
    result per case."""
    results = []
    for name, capacity_factor, ep, dedup, recompute in cases:
        cfg = family(name, capacity_factor)
        results.append(parallel_run(rank, world_size, cfg, ParallelConfig(ep=ep, dedup=dedup),
                                    steps, recompute))
    return results
