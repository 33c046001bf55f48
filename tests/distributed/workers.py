"""What the ranks run in the distributed tests, and the single-process references they match."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from moetrain.config import LoRAConfig, ModelConfig, ParallelConfig
from moetrain.loss import next_token_loss
from moetrain.model import Transformer
from moetrain.model.balance import pop_step_loads, update_expert_bias
from moetrain.model.lora import apply_lora
from moetrain.parallel import (accumulating, all_reduce_sum, build_mesh, clip_grad_norm_,
                               finalize_grads, parallelize)
from moetrain.presets import tiny_deepseek, tiny_expert_choice, tiny_mixtral
from moetrain.probes import ForwardCounter

STEPS, LR, EPS, CLIP, GLOBAL_BATCH, SEQ, SEED = 5, 1e-3, 1e-6, 0.5, 8, 16, 7


def family(name: str, capacity_factor=None) -> ModelConfig:
    """A tiny preset of moetrain.presets at SEQ positions, with smaller experts and larger
    balancing coefficients than the unit tests use."""
    if name == "expert_choice":  # a variable number of experts per token through the exchange
        return tiny_expert_choice(max_seq_len=SEQ, n_kv_heads=None,
                                  moe=dict(expert_hidden=16, capacity_factor=capacity_factor))
    if name.startswith("mixtral"):
        stats = "global_batch" if name == "mixtral_global" else "micro_batch"
        return tiny_mixtral(max_seq_len=SEQ, tie_embeddings=name == "mixtral_tied",
                            moe=dict(expert_hidden=16, capacity_factor=capacity_factor),
                            balance=dict(aux_loss_coef=0.1, aux_loss_stats=stats))
    return tiny_deepseek(max_seq_len=SEQ, ffn_hidden=48,
                         moe=dict(expert_hidden=8, capacity_factor=capacity_factor),
                         balance=dict(aux_loss_coef=0.01, bias_update_rate=0.01))


def lora_config(name: str, lora: bool | str = True) -> LoRAConfig:
    """Adapters on every kind of layer the family has; lora="experts": on the routed experts
    alone (the default targets: nothing but expert DTensors trains). The base is frozen."""
    targets = (["experts"] if lora == "experts" else
               ["experts", "shared_experts", "dense_ffn", "attention"] if name == "deepseek"
               else ["experts", "attention"])
    return LoRAConfig(rank=4, alpha=8.0, targets=targets)


def global_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, 64, (GLOBAL_BATCH, SEQ + 1), generator=g)


def lm_loss(module, tokens):
    logits, aux = module(tokens[:, :-1])
    return next_token_loss(logits, tokens) + aux


def layer_counts(model) -> torch.Tensor:
    return torch.stack([m.last_stats["tokens_per_expert"].float() for m in model.moe_layers()])


def layer_dropped(model) -> float:
    return max(m.last_stats["dropped_fraction"].item() for m in model.moe_layers())


@dataclass(frozen=True)
class Case:
    """One layout of the equivalence gate."""

    family: str
    capacity_factor: float | None = None
    ep: int = 1
    data_parallel: str = "fsdp"
    dedup: bool = True
    recompute: bool = False  # activation checkpointing
    accum: int = 1  # micro-batches per rank per step
    dtype: str = "fp32"  # fp32 | fp64
    dp_replicate: int = 1  # HSDP groups
    defer_sync: bool = False  # FSDP accumulation with unsharded parameters and gradients
    lora: bool | str = False  # a LoRA fine-tune (lora_config): adapters train, base frozen

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "fp64" else torch.float32


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def reference_run(cfg: ModelConfig, micro_batches: int, steps: int = STEPS,
                  dtype: torch.dtype = torch.float32, lora: LoRAConfig | None = None,
                  world: int = 1) -> dict:
    """One process, the global batch as `micro_batches` equal micro-batches: one per rank and
    accumulation step, or (world > 1) one per accumulation step holding that step's rows of
    every rank's share, as global-batch statistics see them. One thread, like each rank:
    matmul results can differ in the last bit with thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with default_dtype(dtype):
            return _reference_run(cfg, micro_batches, steps, lora, world)
    finally:
        torch.set_num_threads(threads)


def _reference_run(cfg: ModelConfig, micro_batches: int, steps: int,
                   lora: LoRAConfig | None, world: int) -> dict:
    torch.manual_seed(0)
    model = Transformer(copy.deepcopy(cfg))
    if lora is not None:
        apply_lora(model, lora)
    model.init_weights(SEED)
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    batch = global_batch()
    if world > 1:  # rank r's accumulation step i, for every r, is micro-batch i here
        batch = torch.cat([share.chunk(micro_batches)[i] for i in range(micro_batches)
                           for share in batch.chunk(world)])
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
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        loads = pop_step_loads(model.moe_layers())  # every step, as the trainer does
        if cfg.balance.aux_free:
            update_expert_bias(model.moe_layers(), loads, cfg.balance.bias_update_rate)
        losses.append(total)
        counts.append(step_counts)
    return {"losses": losses, "counts": torch.stack(counts), "max_dropped": max(dropped),
            "grad_norms": norms, "first_grads": first_grads, "init_state": init_state,
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


_MESHES = {}


def mesh_for(pcfg: ParallelConfig, num_experts: int):
    """One mesh per (ep, dp_replicate) for the whole spawn: building one creates groups."""
    key = (pcfg.ep, pcfg.dp_replicate)
    if key not in _MESHES:
        _MESHES[key] = build_mesh(pcfg, num_experts)
    return _MESHES[key]


def parallel_run(rank: int, world_size: int, case: Case, steps: int = STEPS) -> dict:
    with default_dtype(case.torch_dtype):
        return _parallel_run(rank, world_size, case, steps)


def _parallel_run(rank: int, world_size: int, case: Case, steps: int) -> dict:
    cfg = family(case.family, case.capacity_factor)
    pcfg = ParallelConfig(ep=case.ep, dedup=case.dedup, data_parallel=case.data_parallel,
                          dp_replicate=case.dp_replicate)
    mesh = mesh_for(pcfg, cfg.moe.num_experts)
    with torch.device("meta"):  # as the trainer does: only this rank's shards are ever built
        model = Transformer(copy.deepcopy(cfg))
        if case.lora:
            apply_lora(model, lora_config(case.family, case.lora))
    moe_forwards = ForwardCounter(model.moe_layers())  # twice per layer when recomputed
    module = parallelize(model, mesh, pcfg, seed=SEED, activation_checkpointing=case.recompute)
    init_state = gather_logical(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    per_rank = GLOBAL_BATCH // world_size
    tokens = global_batch()[rank * per_rank:(rank + 1) * per_rank]
    reduce = all_reduce_sum(dist.group.WORLD)
    losses, counts, norms = [], [], []
    for step in range(steps):
        opt.zero_grad()
        total, step_counts = 0.0, 0
        for i, micro in enumerate(tokens.chunk(case.accum)):
            last = i == case.accum - 1
            with contextlib.nullcontext() if last else accumulating(module, case.defer_sync):
                loss = lm_loss(module, micro) / case.accum
                loss.backward()
            total += loss.detach()
            step_counts = step_counts + reduce(layer_counts(model))
        finalize_grads(model, mesh)
        if step == 0:
            first_grads = gather_logical({n: p.grad for n, p in model.named_parameters()
                                          if p.grad is not None})
        norms.append(clip_grad_norm_(model, CLIP).item())
        opt.step()
        loads = pop_step_loads(model.moe_layers(), reduce)  # every step, as the trainer does
        if cfg.balance.aux_free:
            update_expert_bias(model.moe_layers(), loads, cfg.balance.bias_update_rate)
        losses.append(reduce(total).item() / world_size)
        counts.append(step_counts)
    return {"losses": losses, "counts": torch.stack(counts), "grad_norms": norms,
            "first_grads": first_grads, "init_state": init_state,
            "state": gather_logical(model.state_dict()),
            "moe_forwards": moe_forwards.calls / (steps * case.accum * len(model.moe_layers())),
            "expert_bias": [m.router.expert_bias.clone() for m in model.moe_layers()
                            if hasattr(m.router, "expert_bias")]}


def gather_logical(tensors: dict) -> dict:
    """The logical (unsharded) view: DTensors (expert blocks, FSDP shards) gathered whole."""
    return {name: (value.full_tensor() if isinstance(value, DTensor) else value).detach().clone()
            for name, value in tensors.items()}


def run_cases(rank: int, world_size: int, cases: list[Case], steps: int = STEPS) -> list[dict]:
    return [parallel_run(rank, world_size, case, steps) for case in cases]
