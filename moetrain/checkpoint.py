"""Checkpoints in the logical layout, written atomically, resumable on another layout.

A checkpoint is a directory `checkpoints/step_XXXXXXXX/` holding:
  - a torch.distributed.checkpoint (DCP) of the model and optimizer tensors under logical names
    (`model.layers.1.ffn.experts.w_gate`, `optim.<param>.exp_avg`, ...). Sharded parameters
    are DTensors (experts on dim 0 over "ep", FSDP shards over the data-parallel ranks), so DCP
    stores each tensor once, in its full logical shape, and reshards it on load: a checkpoint
    written by any layout (ddp or fsdp, any ep) resumes under any other.
  - `extra_rank{r}.pt`: step, scheduler, learning rates, data position, RNG states and the
    collapse detector (plain values; read back with weights_only=True).
  - `config.yaml`: the resolved config of the run that wrote it.
It is written to `step_XXXXXXXX.tmp/` and renamed when every rank has finished, so a crash
mid-save leaves the previous checkpoint intact and a partial one is never loaded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

PREFIX = "step_"
TMP_SUFFIX = ".tmp"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(root: Path, warn: bool = True) -> list[Path]:
    """Complete checkpoints, oldest first. Partial ones (a .tmp directory, or no DCP
    metadata) are skipped with a warning."""
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if not path.name.startswith(PREFIX):
            continue
        if path.name.endswith(TMP_SUFFIX) or not (path / ".metadata").is_file():
            if warn:
                print(f"WARNING: skipping partial checkpoint {path} (an interrupted save)",
                      file=sys.stderr, flush=True)
            continue
        found.append(path)
    return found


def resolve_resume(resume: str | None, run_dir: Path, field: str = "resume") -> Path | None:
    """`auto`: the newest complete checkpoint of this run dir (None if there is none);
    a path: that checkpoint, which must be complete."""
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(checkpoint_dir(run_dir))
        return found[-1] if found else None
    path = Path(resume)
    if not (path / ".metadata").is_file():
        raise ValueError(f"{field}={resume!r} is not a complete checkpoint directory (no DCP "
                         ".metadata); use 'auto' or a checkpoints/step_XXXXXXXX path")
    return path


@contextlib.contextmanager
def quiet_single_process():
    """Without a process group DCP warns that it saves or loads in one process: that is the
    intent whenever moetrain runs without one."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled",
                                    category=UserWarning)
        yield


def find_checkpoint(path: str | Path, field: str = "checkpoint") -> Path:
    """A checkpoint directory as given, or the newest complete checkpoint of a run directory."""
    path = Path(path)
    if (path / ".metadata").is_file():
        return path
    found = complete_checkpoints(checkpoint_dir(path), warn=False) if path.is_dir() else []
    if not found:
        raise ValueError(f"{field}={str(path)!r} is neither a checkpoint directory (with DCP "
                         f".metadata) nor a run directory with a complete checkpoint under "
                         f"checkpoints/")
    return found[-1]


def load_run_config(checkpoint: Path):
    """The resolved RunConfig saved beside a checkpoint."""
    from omegaconf import OmegaConf

    from moetrain.config import RunConfig
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig),
                                               OmegaConf.load(Path(checkpoint) / "config.yaml")))


def load_model(source: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode with full tensors, RunConfig) in this one process, from a run or
    checkpoint directory written by any layout, or from `hf:DIR` (a transformers checkpoint).
    Built on the meta device and never initialised: every parameter and buffer is loaded."""
    from moetrain.model import Transformer
    if str(source).startswith("hf:"):
        from moetrain.hf import load_hf_model
        model, cfg = load_hf_model(str(source)[3:], device=device)
        return model.eval(), cfg
    checkpoint = find_checkpoint(source)
    cfg = load_run_config(checkpoint)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model.to_empty(device=device)
    model.init_buffers()
    load_model_weights(model, checkpoint)
    return model.eval(), cfg


def load_model_weights(model, checkpoint: Path) -> None:
    """Every parameter and persistent buffer of `model` (plain, or sharded by any layout) from
    a checkpoint's `model.*` tensors, strictly: DCP reshards them to this layout."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    Checkpointer._load_strict(state, checkpoint, prefix="model.")


class Checkpointer:
    def __init__(self, trainer):
        self.trainer = trainer
        self.root = checkpoint_dir(trainer.run_dir)

    # ---------------------------------------------------------------- tensors
    def _tensor_state(self) -> dict:
        """Every tensor to save or load into, keyed by logical name. Sharded parameters (expert
        blocks, FSDP shards) and their optimizer slots are DTensors of their logical shape, so
        DCP stores each tensor once and reshards it on load; nothing is gathered on a rank.
        Loading writes into these in place: they are the parameters and the optimizer state."""
        model, optimizer = self.trainer.model, self.trainer.optimizer
        state = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            slots = optimizer.state[param]
            if not slots:  # before the first step: create AdamW's slots so they can be loaded
                slots.update(step=torch.zeros((), dtype=torch.float32),
                             exp_avg=torch.zeros_like(param),
                             exp_avg_sq=torch.zeros_like(param))
            state[f"optim.{name}.step"] = slots["step"]
            state[f"optim.{name}.exp_avg"] = slots["exp_avg"]
            state[f"optim.{name}.exp_avg_sq"] = slots["exp_avg_sq"]
        return state

    def _extra_state(self) -> dict:
        t = self.trainer
        extra = {
            "step": t.step,
            "scheduler": t.scheduler.state_dict(),
            "lr": [group["lr"] for group in t.optimizer.param_groups],
            "data": t.data.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "detector": t.detector.state_dict() if t.detector is not None else None,
        }
        if torch.cuda.is_available():
            extra["rng_cuda"] = torch.cuda.get_rng_state()
        return extra

    # ---------------------------------------------------------------- save
    def save(self, config_yaml: str) -> Path:
        t = self.trainer
        final = self.root / f"{PREFIX}{t.step:08d}"
        tmp = final.with_name(final.name + TMP_SUFFIX)
        if t.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self._barrier()
        with quiet_single_process():
            dcp.save(self._tensor_state(), checkpoint_id=str(tmp))
        torch.save(self._extra_state(), tmp / f"extra_rank{t.rank}.pt")
        self._barrier()  # every rank's files are in place
        if t.rank == 0:
            (tmp / "config.yaml").write_text(config_yaml)
            if final.exists():  # re-saving the same step: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)  # atomic: the checkpoint appears complete or not at all
            self._prune()
        self._barrier()
        return final

    def _prune(self) -> None:
        keep = self.trainer.cfg.checkpoint.keep_last
        if keep <= 0:
            return
        for old in complete_checkpoints(self.root, warn=False)[:-keep]:
            shutil.rmtree(old)

    # ---------------------------------------------------------------- load
    @staticmethod
    def _load_strict(state: dict, path: Path, prefix: str = "") -> None:
        """DCP-load `state` in place after checking that the checkpoint's keys (those starting
        with `prefix`) are exactly these: never a model with some weights left at init."""
        saved = {k for k in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
                 if k.startswith(prefix)}
        missing, unexpected = sorted(set(state) - saved), sorted(saved - set(state))
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not match this model: missing keys "
                             f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected "
                             f"keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        with quiet_single_process():
            dcp.load(state, checkpoint_id=str(path))

    def load_weights(self, path: Path) -> None:
        """Model weights and buffers (expert bias included) only, for a new run (init_from):
        the optimizer, schedule, data position and step start afresh."""
        load_model_weights(self.trainer.model, path)

    def load(self, path: Path) -> None:
        t = self.trainer
        self._load_strict(self._tensor_state(), path)
        own = path / f"extra_rank{t.rank}.pt"
        # On a different number of ranks, every rank takes rank 0's (layout-free) extras.
        extra = torch.load(own if own.is_file() else path / "extra_rank0.pt",
                           weights_only=True)
        t.step = extra["step"]
        t.scheduler.load_state_dict(extra["scheduler"])
        for group, lr in zip(t.optimizer.param_groups, extra["lr"]):
            group["lr"] = lr
        t.data.load_state_dict(extra["data"])
        torch.set_rng_state(extra["rng_cpu"])
        if "rng_cuda" in extra and torch.cuda.is_available():
            torch.cuda.set_rng_state(extra["rng_cuda"])
        if t.detector is not None and extra["detector"] is not None:
            t.detector.load_state_dict(extra["detector"])

    def _barrier(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
