"""The pretraining loop: build, parallelize, train, validate, monitor, log.

Order at start-up: validate the whole config (no collective yet), load and check the data, join
the process group, pick the run directory on rank 0, build the model with the same seed on
every rank, parallelize, then loop.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist

from moetrain.checkpoint import Checkpointer, resolve_resume
from moetrain.config import RunConfig
from moetrain.data.loader import build_data
from moetrain.hf.convert import import_model_config, load_hf_weights_
from moetrain.hf.tokenizer import tokenizer_setting
from moetrain.loggers import RunLogger
from moetrain.loss import next_token_loss
from moetrain.model import Transformer, num_params
from moetrain.model.balance import pop_step_loads, update_expert_bias
from moetrain.monitor import CollapseDetector, expert_load_record
from moetrain.optim import build_optimizer
from moetrain.parallel import (accumulating, all_reduce_sum, build_mesh, clip_grad_norm_,
                               finalize_grads, init_distributed, parallelize)
from moetrain.parallel.memory import format_bytes, state_bytes_per_rank


class TrainingStopped(RuntimeError):
    """A policy stopped the run (non-finite loss, expert collapse); the message says why."""


PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def describe(cfg: RunConfig, model: Transformer, world: int) -> str:
    counts = num_params(model)
    lines = [f"parameters: {counts['total']:,} total, {counts['active']:,} active per token"]
    moe = cfg.model.moe
    if moe is not None:
        ep = cfg.parallel.ep
        lines.append(f"experts: {moe.num_experts} per MoE layer x {len(cfg.model.moe_layers)} "
                     f"layers, top-{moe.top_k}, {moe.num_experts // ep} per rank")
    else:
        lines.append("experts: none (dense model)")
    par = cfg.parallel
    ep = par.ep
    kind = "none (one process)" if world == 1 else par.data_parallel
    if world > 1 and par.data_parallel == "fsdp" and par.dp_replicate > 1:
        kind = f"hsdp ({par.dp_replicate} replicas x {world // par.dp_replicate} shards)"
    lines.append(f"mesh: world {world} = ep {ep} x edp {world // ep}; data parallel: {kind}")
    state = state_bytes_per_rank(model, par, world)
    lines.append("per rank (fp32): " + ", ".join(f"{name} {format_bytes(size)}"
                                                  for name, size in state.items())
                 + f"; total {format_bytes(sum(state.values()))} before activations")
    return "\n".join(lines)


def apply_init_from_hf(cfg: RunConfig) -> str | None:
    """With init_from=hf:DIR, the model's architecture (and, unless one is set, the tokenizer)
    come from that transformers checkpoint; returns DIR, or None for any other init_from."""
    if not (cfg.init_from and cfg.init_from.startswith("hf:")):
        return None
    hf_dir = cfg.init_from[3:]
    cfg.model = import_model_config(hf_dir, keep=cfg.model)
    if cfg.data.tokenizer == "byte" and tokenizer_setting(hf_dir) != "byte":
        cfg.data.tokenizer = tokenizer_setting(hf_dir)
        print(f"init_from=hf:{hf_dir}: using its tokenizer (data.tokenizer="
              f"{cfg.data.tokenizer})", flush=True)
    return hf_dir


def dry_run(cfg: RunConfig) -> dict:
    """Build on the meta device (no memory, any size) and report sizes and layout."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    print(describe(cfg, model, world_size_from_env()), flush=True)
    return num_params(model)


class Trainer:
    def __init__(self, cfg: RunConfig):
        world = world_size_from_env()
        hf_dir = apply_init_from_hf(cfg)
        cfg.validate(world)
        self.cfg = cfg
        env_rank = int(os.environ.get("RANK", "0"))
        self.data, self.val_blocks = build_data(cfg.data, cfg.train.micro_batch_size, env_rank,
                                                world, cfg.model.vocab_size,
                                                cfg.train.grad_accum)
        # An explicit checkpoint path is checked on every rank, before any collective.
        init_from = (None if hf_dir is not None
                     else resolve_resume(cfg.init_from, Path("."), field="init_from"))
        if cfg.resume not in (None, "auto"):
            resolve_resume(cfg.resume, Path("."))
        self.distributed = world > 1 or "MASTER_ADDR" in os.environ
        if self.distributed:
            self.rank, self.world = init_distributed(cfg.parallel.timeout_s)
        else:
            self.rank, self.world = 0, 1
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if torch.cuda.is_available() else torch.device("cpu"))
        self.run_dir = self._choose_run_dir()

        torch.manual_seed(cfg.train.seed)  # the same router-jitter stream on every rank
        self.mesh = None
        if self.distributed:
            num_experts = cfg.model.moe.num_experts if cfg.model.moe else None
            self.mesh = build_mesh(cfg.parallel, num_experts)
        # Built on the meta device; parallelize materialises only this rank's shards, with the
        # weights one process would have for this seed.
        with torch.device("meta"):
            self.model = Transformer(cfg.model)
        self.fsdp = self.world > 1 and cfg.parallel.data_parallel == "fsdp"
        self.module = parallelize(
            self.model, self.mesh, cfg.parallel, device=self.device, seed=cfg.train.seed,
            activation_checkpointing=cfg.train.activation_checkpointing == "full",
            compile=cfg.train.compile, mixed_precision=self.fsdp and self.device.type == "cuda")
        self.moe_layers = self.model.moe_layers()
        self.moe_layer_ids = [i for i, layer in enumerate(self.model.layers) if layer.is_moe]
        self.reduce = all_reduce_sum(dist.group.WORLD) if self.distributed else None
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim, cfg.train.steps)
        self.detector = (CollapseDetector(cfg.monitor, self.moe_layer_ids,
                                          cfg.model.moe.num_experts) if self.moe_layers else None)
        self.step = 0
        self.logger = None
        self.checkpointer = Checkpointer(self)
        resume_from = self._broadcast(resolve_resume(cfg.resume, self.run_dir)
                                      if self.rank == 0 else None)
        self.resumed_from = resume_from
        if resume_from is not None:
            self.checkpointer.load(Path(resume_from))
        elif init_from is not None:
            self.checkpointer.load_weights(init_from)
        elif hf_dir is not None:
            load_hf_weights_(self.model, hf_dir)

    # ------------------------------------------------------------------ setup helpers
    def _broadcast(self, value):
        """Rank 0's value on every rank."""
        if self.distributed and self.world > 1:
            box = [value]
            dist.broadcast_object_list(box, src=0)
            return box[0]
        return value

    def _choose_run_dir(self) -> Path:
        """Rank 0 decides and creates it; the others receive the same path."""
        path = None
        if self.rank == 0:
            if self.cfg.run_dir:
                path = self.cfg.run_dir
            else:
                stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
                path = os.path.join("runs", f"{self.cfg.name}-{stamp}")
            Path(path).mkdir(parents=True, exist_ok=True)
        return Path(self._broadcast(path))

    def _autocast(self):
        """bf16 on CUDA: FSDP's mixed-precision policy, or else autocast."""
        if self.device.type == "cuda" and not self.fsdp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _peak_flops(self) -> float | None:
        if self.device.type != "cuda":
            return None
        if self.cfg.train.peak_tflops:
            return self.cfg.train.peak_tflops * 1e12
        name = torch.cuda.get_device_name(self.device)
        return next((v * 1e12 for k, v in PEAK_TFLOPS_BF16.items() if k in name), None)

    def _flops_per_token(self) -> float:
        m, T = self.cfg.model, self.cfg.data.seq_len
        return 6 * num_params(self.model)["active"] + 12 * m.n_layers * m.dim * T

    # ------------------------------------------------------------------ the loop
    def loss_on(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, T + 1) -> (cross-entropy, aux loss)."""
        with self._autocast():
            logits, aux = self.module(tokens[:, :-1])
        return next_token_loss(logits, tokens), aux

    def train_step(self) -> dict:
        cfg = self.cfg
        accum = cfg.train.grad_accum
        ce_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        for micro in range(accum):
            tokens = self.data.next_batch().to(self.device)
            # DDP (and FSDP with parallel.fsdp_defer_sync) reduces gradients once, in the last
            # micro-batch's backward; FSDP otherwise reduce-scatters after each one.
            with (accumulating(self.module, cfg.parallel.fsdp_defer_sync)
                  if micro < accum - 1 else contextlib.nullcontext()):
                ce, aux = self.loss_on(tokens)
                ((ce + aux) / accum).backward()
            ce_sum += ce.detach() / accum
            aux_sum += aux.detach() / accum
        if self.distributed:
            finalize_grads(self.model, self.mesh)
        losses = torch.stack([ce_sum, aux_sum])
        if self.reduce is not None:
            losses = self.reduce(losses) / self.world
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        grad_norm = clip_grad_norm_(self.model, max_norm)
        ce_value, aux_value = losses.tolist()  # one sync per step; every rank sees the same
        loads = pop_step_loads(self.moe_layers, self.reduce) if self.moe_layers else None
        finite = math.isfinite(ce_value + aux_value) and math.isfinite(grad_norm.item())
        if finite:
            self.optimizer.step()
            if loads is not None and cfg.model.balance.aux_free:
                update_expert_bias(self.moe_layers, loads, cfg.model.balance.bias_update_rate,
                                   cfg.model.balance.bias_center)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if not finite:
            message = (f"non-finite loss at step {self.step + 1} (cross-entropy {ce_value}, "
                       f"aux {aux_value}, grad norm {grad_norm.item()})")
            if cfg.train.on_nonfinite == "stop":
                raise TrainingStopped(message + "; stopping (train.on_nonfinite=stop); no "
                                      "checkpoint of these weights is written")
            self._warn(message + "; step skipped (train.on_nonfinite=skip)")
        return {"ce_loss": ce_value, "aux_loss": aux_value, "loss": ce_value + aux_value,
                "grad_norm": grad_norm.item(), "loads": loads, "skipped": not finite}

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean validation cross-entropy over the same number of batches on every rank (the
        MoE layers hold collectives, so every rank must run every forward)."""
        if self.val_blocks is None:
            return None
        per_rank = len(self.val_blocks) // self.world
        if per_rank == 0:
            return None
        size = min(self.cfg.train.micro_batch_size, per_rank)
        batches = min(self.cfg.train.val_batches, per_rank // size)
        shard = self.val_blocks[self.rank * per_rank:(self.rank + 1) * per_rank]
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for i in range(batches):
            ce, _ = self.loss_on(shard[i * size:(i + 1) * size].to(self.device))
            total += ce
        self.model.train()
        total = total / batches
        if self.reduce is not None:
            total = self.reduce(total) / self.world
        return total.item()

    def fit(self) -> dict:
        from omegaconf import OmegaConf
        cfg = self.cfg
        resolved = OmegaConf.to_yaml(OmegaConf.structured(cfg))
        if self.rank == 0:
            (self.run_dir / "config.yaml").write_text(resolved)
            print(describe(cfg, self.model, self.world), flush=True)
            print(f"run dir: {self.run_dir}", flush=True)
            self.logger = RunLogger(cfg.logger, self.run_dir,
                                    OmegaConf.to_container(OmegaConf.structured(cfg)),
                                    cfg.name, cfg.train.steps)
            if self.resumed_from is not None:
                print(f"resumed from {self.resumed_from} at step {self.step}", flush=True)
                self.logger.event({"event": "resume", "step": self.step,
                                   "checkpoint": str(self.resumed_from)})
        tokens_per_step = (cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.data.seq_len
                           * self.world)
        peak = self._peak_flops()
        summary = {}
        window_start, window_steps = time.perf_counter(), 0
        try:
            while self.step < cfg.train.steps:
                out = self.train_step()
                self.step += 1
                window_steps += 1
                last = self.step == cfg.train.steps
                exiting = self.step == cfg.train.exit_at_step and not last
                record = None
                if self.step % cfg.train.log_every == 0 or last:
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = tokens_per_step * window_steps / max(elapsed, 1e-9)
                    window_start, window_steps = time.perf_counter(), 0
                    record = {"step": self.step, "loss": out["loss"], "ce_loss": out["ce_loss"],
                              "aux_loss": out["aux_loss"], "grad_norm": out["grad_norm"],
                              "lr": self.scheduler.get_last_lr()[0],
                              "tokens_per_s": tokens_per_s,
                              "tokens_seen": tokens_per_step * self.step}
                    if peak:
                        record["mfu"] = (tokens_per_s * self._flops_per_token() / self.world
                                         / peak)
                    if out["loads"] is not None:
                        if self.logger is not None:  # rank 0 alone writes the record
                            record["moe"] = expert_load_record(
                                self.moe_layers, self.moe_layer_ids, out["loads"])
                        self._check_collapse(out["loads"])  # every rank: a stop is collective
                if cfg.train.val_every and (self.step % cfg.train.val_every == 0 or last):
                    val_loss = self.validate()
                    if val_loss is not None:
                        record = record or {"step": self.step}
                        record["val_loss"] = val_loss
                        summary["val_loss"] = val_loss
                if record is not None and self.logger is not None:
                    self.logger.log(record)
                    if "tokens_per_s" in record:
                        worst = (max(record["moe"]["max_violation_global"])
                                 if "moe" in record else None)
                        self.logger.progress(self.step, out["loss"], record["tokens_per_s"],
                                             worst)
                summary.update(step=self.step, loss=out["loss"])
                every = cfg.checkpoint.every
                if (every and self.step % every == 0) or (last and cfg.checkpoint.at_end) \
                        or exiting:
                    self.checkpointer.save(resolved)
                if exiting:
                    break
        finally:
            if self.logger is not None:
                self.logger.close()
        return summary

    def _check_collapse(self, loads: torch.Tensor) -> None:
        messages = self.detector.update(loads)
        for message in messages:
            if self.logger is not None:
                self.logger.alert(message)
        if messages and self.cfg.monitor.on_collapse == "stop":
            raise TrainingStopped(f"{messages[0]} at step {self.step}; stopping "
                                  "(monitor.on_collapse=stop)")

    def _warn(self, message: str) -> None:
        if self.rank == 0:
            print(f"WARNING: {message}", file=sys.stderr, flush=True)
