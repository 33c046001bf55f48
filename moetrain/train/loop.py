"""The pretraining loop: a Trainer composed of the pieces it drives.

Order at start-up: validate the whole config (no collective yet), load and check the data, join
the process group, pick the run directory on rank 0, build the model with the same seed on
every rank, parallelize, choose and verify the checkpoint to continue from, then loop.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import torch
import torch.distributed as dist

from moetrain.checkpoint import (Checkpointer, check_lora_base, checked_path, checkpoint_dir,
                                 load_lora_base, load_run_config, resolve_resume,
                                 supersede_newer)
from moetrain.config import RunConfig
from moetrain.data.loader import build_data
from moetrain.data.tokenizer import build_tokenizer, token_byte_lengths
from moetrain.hf.convert import load_hf_weights_
from moetrain.loggers import RunLogger
from moetrain.loss import next_token_loss
from moetrain.model import num_params
from moetrain.model.balance import load_metrics, pop_step_loads, update_expert_bias
from moetrain.model.lora import trainable_state_names
from moetrain.monitor import CollapseDetector, expert_load_record
from moetrain.optim import build_optimizer
from moetrain.parallel import accumulating, all_reduce_sum, clip_grad_norm_, finalize_grads
from moetrain.train.preemption import SIGNALS, STOP, Preempted
from moetrain.train.setup import (apply_init_from_hf, build_model, check_new_run_dir,
                                  check_same_lora_base, check_same_tokenizer, choose_run_dir,
                                  describe, join_ranks, record_absolute_paths,
                                  world_size_from_env)
from moetrain.train.throughput import PhaseTimer, Throughput, flops_per_token, peak_flops


class TrainingStopped(RuntimeError):
    """A policy stopped the run (non-finite loss, expert collapse); the message says why."""


class Trainer:
    def __init__(self, cfg: RunConfig):
        world = world_size_from_env()
        hf_dir = apply_init_from_hf(cfg)
        cfg.validate(world)
        self.cfg = cfg
        # An explicit checkpoint path is checked on every rank, before any collective and
        # before any data is read (tokenizing a corpus under the wrong tokenizer is wasted).
        init_from = (checked_path(cfg.init_from, "init_from")
                     if cfg.init_from and hf_dir is None else None)
        if init_from is not None:
            check_same_tokenizer(cfg, load_run_config(init_from))
        if cfg.resume not in (None, "auto"):
            resume = checked_path(cfg.resume)
            check_same_tokenizer(cfg, load_run_config(resume), "resume", str(resume))
        if cfg.resume is None and cfg.run_dir:
            check_new_run_dir(cfg.run_dir)
        self.data, self.val_blocks = build_data(
            cfg.data, cfg.train.micro_batch_size, int(os.environ.get("RANK", "0")), world,
            cfg.model.vocab_size, cfg.train.grad_accum)
        self._val_bytes_per_token = None
        lora = cfg.finetune.lora.enabled
        if init_from is not None:
            check_lora_base(cfg.init_from)
        # config.yaml (and a LoRA checkpoint, which names its base) must work from anywhere
        record_absolute_paths(cfg)
        self.ranks = join_ranks(cfg)
        self.rank, self.world, self.device = self.ranks.rank, self.ranks.world, self.ranks.device
        self.run_dir = choose_run_dir(cfg, self.ranks)

        self.model, self.module, self.mesh = build_model(cfg, self.ranks)
        self.fsdp = self.world > 1 and cfg.parallel.data_parallel == "fsdp"
        self.moe_layers = self.model.moe_layers()
        self.moe_layer_ids = [i for i, layer in enumerate(self.model.layers) if layer.is_moe]
        self.reduce = all_reduce_sum(dist.group.WORLD) if self.ranks.distributed else None
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim, cfg.train.steps)
        self.detector = (CollapseDetector(cfg.monitor, self.moe_layer_ids,
                                          cfg.model.moe.num_experts) if self.moe_layers else None)
        self.checkpointer = Checkpointer(
            checkpoint_dir(self.run_dir), self.model, self.optimizer, self.scheduler, self.data,
            self.detector, keep_last=cfg.checkpoint.keep_last,
            model_keys=trainable_state_names(self.model) if lora else None)
        self.step = 0
        self.logger = None
        self.signals = STOP
        self.phase = PhaseTimer(cfg.train.time_phases, self.device)
        # Verified collectively: each rank hashes its share of the files.
        self.resumed_from = resolve_resume(cfg.resume, self.run_dir)
        # resume=auto finds its checkpoint only here (an explicit path was checked above): e.g.
        # a bytes run resumed after the default became a BPE
        if cfg.resume == "auto" and self.resumed_from is not None:
            check_same_tokenizer(cfg, load_run_config(self.resumed_from), "resume",
                                 str(self.resumed_from))
        if lora:  # the frozen base, then (resuming) the adapters and optimizer state
            if self.resumed_from is not None:
                check_same_lora_base(cfg, load_run_config(self.resumed_from),
                                     self.resumed_from)
            if init_from is not None:
                resolve_resume(str(init_from), self.run_dir, field="init_from")  # verifies
            load_lora_base(self.model, cfg.init_from, verified=True)
            if self.resumed_from is not None:
                self.step = self.checkpointer.load(self.resumed_from)
        elif self.resumed_from is not None:
            self.step = self.checkpointer.load(self.resumed_from)
        elif init_from is not None:
            resolve_resume(str(init_from), self.run_dir, field="init_from")  # verifies
            self.checkpointer.load_weights(init_from)
        elif hf_dir is not None:
            load_hf_weights_(self.model, hf_dir)
        if self.step > cfg.train.steps:  # (equal: a finished run, which trains no further)
            raise ValueError(f"train.steps={cfg.train.steps} is below the step of the "
                             f"checkpoint it resumes ({self.step}: {self.resumed_from}); set "
                             f"train.steps above {self.step} to train on")
        exit_at = cfg.train.exit_at_step
        if exit_at is not None and self.step >= exit_at and self.rank == 0:
            print(f"WARNING: train.exit_at_step={exit_at} is not after the resumed step "
                  f"{self.step}: this job runs to train.steps={cfg.train.steps}", flush=True)
        if self.resumed_from is not None and self.rank == 0:
            moved = supersede_newer(checkpoint_dir(self.run_dir), self.step)
            if moved:
                print(f"WARNING: resumed at step {self.step}; the newer checkpoints of "
                      f"{self.run_dir} ({', '.join(p.name for p in moved)}) are moved to "
                      f"{moved[0].parent} and no longer resumed", flush=True)

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        """bf16 on CUDA: FSDP's mixed-precision policy, or else autocast."""
        if self.device.type == "cuda" and not self.fsdp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

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
        lap = self.phase.lap
        lap(None)
        for micro in range(accum):
            tokens = self.data.next_batch().to(self.device)
            lap("data")
            # DDP (and FSDP with parallel.fsdp_defer_sync) reduces gradients once, in the last
            # micro-batch's backward; FSDP otherwise reduce-scatters after each one.
            with (accumulating(self.module, cfg.parallel.fsdp_defer_sync)
                  if micro < accum - 1 else contextlib.nullcontext()):
                ce, aux = self.loss_on(tokens)
                lap("forward")
                ((ce + aux) / accum).backward()
                lap("backward")
            ce_sum += ce.detach() / accum
            aux_sum += aux.detach() / accum
        if self.ranks.distributed:
            finalize_grads(self.model, self.mesh)
        # A stop signal on any rank rides on the step's one all-reduce: every rank learns of
        # it after the same step.
        signum = self.signals.signum
        flags = [float(signum == s) for s in SIGNALS]
        losses = torch.tensor([0.0, 0.0, *flags], device=self.device)
        losses[0], losses[1] = ce_sum, aux_sum
        if self.reduce is not None:
            losses = self.reduce(losses)
            losses[:2] /= self.world
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        grad_norm = clip_grad_norm_(self.model, max_norm)
        ce_value, aux_value, *flagged = losses.tolist()  # one sync per step
        lap("grad sync and clip")
        loads = pop_step_loads(self.moe_layers, self.reduce) if self.moe_layers else None
        lap("balance")
        finite = math.isfinite(ce_value + aux_value) and math.isfinite(grad_norm.item())
        if finite:
            self.optimizer.step()
            lap("optimizer")
            if loads is not None and cfg.model.balance.aux_free:
                balance = cfg.model.balance
                update_expert_bias(self.moe_layers, loads, balance.bias_update_rate,
                                   balance.bias_center, rule=balance.bias_update)
                lap("balance")
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        lap("optimizer")
        if not finite:
            message = (f"non-finite loss at step {self.step + 1} (cross-entropy {ce_value}, "
                       f"aux {aux_value}, grad norm {grad_norm.item()})")
            if cfg.train.on_nonfinite == "stop":
                raise TrainingStopped(message + "; stopping (train.on_nonfinite=stop); no "
                                      "checkpoint of these weights is written")
            self._warn(message + "; step skipped (train.on_nonfinite=skip)")
        return {"ce_loss": ce_value, "aux_loss": aux_value, "loss": ce_value + aux_value,
                "grad_norm": grad_norm.item(), "loads": loads, "skipped": not finite,
                "stop_signal": next((s for s, f in zip(SIGNALS, flagged) if f), None)}

    def _validation_plan(self) -> tuple[int, int, int]:
        """(blocks per rank, batch size, batches) of a validation pass."""
        per_rank = len(self.val_blocks) // self.world
        size = min(self.cfg.train.micro_batch_size, per_rank)
        return per_rank, size, min(self.cfg.train.val_batches, per_rank // max(size, 1))

    def val_bytes_per_token(self) -> float:
        """UTF-8 bytes per predicted token over every rank's validation pass (the same blocks
        each time): validation nats/byte = nats/token / this, comparable across tokenizers."""
        if self._val_bytes_per_token is None:
            per_rank, size, batches = self._validation_plan()
            lengths = token_byte_lengths(build_tokenizer(self.cfg.data.tokenizer))
            targets = torch.cat([self.val_blocks[r * per_rank:r * per_rank + batches * size, 1:]
                                 for r in range(self.world)])
            self._val_bytes_per_token = lengths[targets].sum().item() / targets.numel()
        return self._val_bytes_per_token

    @torch.no_grad()
    def validate(self) -> tuple[float, torch.Tensor | None] | None:
        """Mean validation cross-entropy over the same number of batches on every rank (the
        MoE layers hold collectives, so every rank must run every forward), and the MoE layers'
        tokens per expert (L, E) summed over every validation token of every rank: the loads
        of the paper's MaxVio_global (Wang et al. 2024), free of one batch's composition."""
        if self.val_blocks is None:
            return None
        per_rank, size, batches = self._validation_plan()
        if per_rank == 0:
            return None
        shard = self.val_blocks[self.rank * per_rank:(self.rank + 1) * per_rank]
        self.model.eval()
        total = torch.zeros((), device=self.device)
        loads = None
        for i in range(batches):
            ce, _ = self.loss_on(shard[i * size:(i + 1) * size].to(self.device))
            total += ce
            if self.moe_layers:
                batch_loads = torch.stack([m.last_stats["tokens_per_expert"].float()
                                           for m in self.moe_layers])
                loads = batch_loads if loads is None else loads + batch_loads
        self.model.train()
        # one collective for the loss and the loads
        packed = total.reshape(1) / batches
        if loads is not None:
            packed = torch.cat([packed, loads.reshape(-1)])
        if self.reduce is not None:
            packed = self.reduce(packed)
            packed[0] /= self.world
        packed = packed.cpu()
        val_loss = packed[0].item()
        return val_loss, (packed[1:].view(loads.shape) if loads is not None else None)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Train to train.steps (or exit_at_step); returns the last step's summary. Raises
        Preempted after a SIGTERM/SIGINT/SIGUSR1, once the stop checkpoint is written."""
        from omegaconf import OmegaConf
        cfg = self.cfg
        if self.step == cfg.train.steps and self.resumed_from is not None:
            if self.rank == 0:  # nothing to log, plot or save: the run's files stay as they are
                print(f"{self.run_dir}: the run is finished (step {self.step} of train.steps="
                      f"{cfg.train.steps}); raise train.steps to train on", flush=True)
            return {"step": self.step}
        resolved = OmegaConf.to_yaml(OmegaConf.structured(cfg))
        if self.rank == 0:
            (self.run_dir / "config.yaml").write_text(resolved)
            print(describe(cfg, self.model, self.world), flush=True)
            print(f"run dir: {self.run_dir}", flush=True)
            self.logger = RunLogger(cfg.logger, self.run_dir,
                                    OmegaConf.to_container(OmegaConf.structured(cfg)),
                                    cfg.name, cfg.train.steps, start_step=self.step,
                                    resumed_from=self.resumed_from)
        tokens_per_step = (cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.data.seq_len
                           * self.world)
        throughput = Throughput(tokens_per_step,
                                flops_per_token(cfg, num_params(self.model)["active"]),
                                peak_flops(self.device, cfg.train.peak_tflops), self.world)
        summary = {}
        installed_here = self.signals.install()
        try:
            self.signals.signum, self.signals.armed = None, True
            while self.step < cfg.train.steps:
                out = self.train_step()
                self.step += 1
                throughput.step()
                self._log(out, throughput, summary)
                self.phase.lap("log and validation")
                summary.update(step=self.step, loss=out["loss"])
                if out["stop_signal"] is not None and self.step < cfg.train.steps:
                    self._stop_on_signal(out["stop_signal"], resolved)
                last = self.step == cfg.train.steps
                exiting = self.step == cfg.train.exit_at_step and not last
                every = cfg.checkpoint.every
                if (every and self.step % every == 0) or (last and cfg.checkpoint.at_end) \
                        or exiting:
                    self.checkpointer.save(self.step, resolved)
                    self.phase.lap("checkpoint")
                if exiting:
                    break
        finally:
            self.signals.armed = False
            if installed_here:
                self.signals.uninstall()
            if self.logger is not None:
                self.logger.close()  # plots too: a stopped run is the one to look at
        return summary

    def _log(self, out: dict, throughput: Throughput, summary: dict) -> None:
        cfg, step = self.cfg, self.step
        last = step == cfg.train.steps
        record, stop = None, None
        if step % cfg.train.log_every == 0 or last:
            if self.phase.enabled:  # this window's steps; log and checkpoint booked up to here
                phases = {"phase_ms": self.phase.read(throughput.steps)}
            record = {"step": step, "loss": out["loss"], "ce_loss": out["ce_loss"],
                      "aux_loss": out["aux_loss"], "grad_norm": out["grad_norm"],
                      "lr": self.scheduler.get_last_lr()[0], **throughput.read(),
                      "tokens_seen": throughput.tokens_per_step * step}
            if self.phase.enabled:
                record.update(phases)
            if out["loads"] is not None:
                if self.logger is not None:  # rank 0 alone writes the record
                    record["moe"] = expert_load_record(self.moe_layers, self.moe_layer_ids,
                                                       out["loads"])
                stop = self._check_collapse(out["loads"])  # every rank: a stop is collective
        if cfg.train.val_every and (step % cfg.train.val_every == 0 or last):
            validated = self.validate()
            if validated is not None:
                val_loss, val_loads = validated
                record = record or {"step": step}
                record["val_loss"] = val_loss
                # bits per byte, as moetrain.evaluate reports: comparable across tokenizers
                # (none for validation text of empty documents alone)
                bytes_per_token = self.val_bytes_per_token()
                if bytes_per_token > 0:
                    record["val_bits_per_byte"] = val_loss / (math.log(2) * bytes_per_token)
                summary["val_loss"] = val_loss
                if val_loads is not None:
                    metrics = load_metrics(val_loads)
                    record["val_moe"] = {
                        "layers": self.moe_layer_ids, "tokens_per_expert": val_loads.tolist(),
                        "max_violation": metrics["max_violation"].tolist(),
                        "dead_experts": metrics["dead_experts"].tolist()}
        if self.logger is not None:
            if record is not None:
                self.logger.log(record)
            if record is not None and "tokens_per_s" in record:
                worst = max(record["moe"]["max_violation_global"]) if "moe" in record else None
                self.logger.progress(step, out["loss"], record["tokens_per_s"], worst)
            else:
                self.logger.advance(step)
        if stop is not None:  # after the step's record: the run to look at has its last step
            raise TrainingStopped(stop)

    def _stop_on_signal(self, signum: int, resolved: str) -> None:
        name = signal.Signals(signum).name
        where = f"stopped by {name} after step {self.step} of {self.cfg.train.steps}"
        if self.cfg.checkpoint.on_preempt:
            path = self.checkpointer.save(self.step, resolved)
            message = f"{where}; checkpoint saved: {path} (continue with resume=auto)"
        else:
            message = f"{where}; no checkpoint written (checkpoint.on_preempt=false)"
        if self.logger is not None:
            self.logger.event({"event": "preempted", "step": self.step, "signal": name})
        raise Preempted(message, signum)

    def _check_collapse(self, loads: torch.Tensor) -> str | None:
        """Alerts for new collapse events; the stop message when they stop the run."""
        events = self.detector.update(loads)
        for event in events:
            if self.logger is not None:
                self.logger.alert({**event, "step": self.step})
        if events and self.cfg.monitor.on_collapse == "stop":
            return (f"{events[0]['message']} at step {self.step}; stopping "
                    "(monitor.on_collapse=stop)")
        return None

    def _warn(self, message: str) -> None:
        if self.logger is not None:
            self.logger.write(f"WARNING: {message}")
