"""Checkpoints in the logical layout, written atomically, verified before use, resumable on
another layout.

A checkpoint is a directory `checkpoints/step_XXXXXXXX/` holding:
  - a torch.distributed.checkpoint (DCP) of the model and optimizer tensors under logical names
    (`model.layers.1.ffn.experts.w_gate`, `optim.<param>.exp_avg`, ...). Sharded parameters
    are DTensors (experts on dim 0 over "ep", FSDP shards over the data-parallel ranks), so DCP
    stores each tensor once, in its full logical shape, and reshards it on load: a checkpoint
    written by any layout (ddp or fsdp, any ep) resumes under any other.
  - `extra_rank{r}.pt`: step, scheduler, learning rates, data position, RNG states and the
    collapse detector (plain values; read back with weights_only=True).
  - `config.yaml`: the resolved config of the run that wrote it.
  - `manifest.json`: size and SHA-256 of every other file (moetrain.integrity), written last.
It is written to `step_XXXXXXXX.tmp/` and renamed when the manifest is complete, so a crash
mid-save leaves the previous checkpoint intact and a partial one is never loaded; a checkpoint
damaged after the fact fails verification and is never loaded either.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from moetrain.integrity import (MANIFEST, CheckpointInvalid, check_files, file_digest,
                                read_manifest, share, write_manifest)

PREFIX = "step_"
TMP_SUFFIX = ".tmp"
_EXTRA = re.compile(r"extra_rank(\d+)\.pt")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def is_checkpoint(path: Path) -> bool:
    """A published checkpoint directory: renamed into place (not .tmp) with a manifest, or
    with DCP metadata for a checkpoint written before manifests."""
    return (not path.name.endswith(TMP_SUFFIX)
            and ((path / MANIFEST).is_file() or (path / ".metadata").is_file()))


def complete_checkpoints(root: Path, warn: bool = True) -> list[Path]:
    """Published checkpoints, oldest first (not yet verified). Partial ones (a .tmp directory,
    or neither manifest nor DCP metadata) are skipped with a warning."""
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if not path.name.startswith(PREFIX):
            continue
        if not is_checkpoint(path):
            if warn:
                _warn(f"skipping partial checkpoint {path} (an interrupted save)")
            continue
        found.append(path)
    return found


SUPERSEDED = "superseded"


def supersede_newer(root: Path, step: int) -> list[Path]:
    """Move the published checkpoints of `root` past `step` into `root/superseded/` and return
    their new paths. A run resumed at `step` (a rollback, or past a corrupted newer one) is
    then the newest: resume=auto continues it, and keep_last, which goes by step, never
    deletes what it writes in favour of an abandoned run's. Nothing is deleted."""
    newer = [path for path in complete_checkpoints(root, warn=False)
             if path.name[len(PREFIX):].isdigit() and int(path.name[len(PREFIX):]) > step]
    moved = []
    for path in newer:
        target, n = root / SUPERSEDED / path.name, 1
        while target.exists():  # superseded before, by an earlier rollback
            n += 1
            target = root / SUPERSEDED / f"{path.name}.{n}"
        target.parent.mkdir(exist_ok=True)
        os.replace(path, target)
        moved.append(target)
    return moved


# -------------------------------------------------------------------- verification
def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(value) -> list:
    rank, world = _rank_world()
    if world == 1:
        return [value]
    out = [None] * world
    dist.all_gather_object(out, value)
    return out


def _broadcast(value):
    """Rank 0's value on every rank."""
    if _rank_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _warn(message: str) -> None:
    if _rank_world()[0] == 0:
        print(f"WARNING: {message}", file=sys.stderr, flush=True)


def verify_checkpoint(path: Path, named: bool = True) -> None:
    """Check every file of the manifest (size, then SHA-256) before anything is loaded.
    Collective under a process group: each rank hashes its share of the files and every rank
    reaches the same verdict. Raises CheckpointInvalid naming the first bad file.

    A checkpoint without a manifest (written before moetrain kept checksums, or one that has
    lost it) cannot be verified: it loads, with a warning, only when `named` explicitly;
    picked by resume=auto it is passed over like a damaged one."""
    path = Path(path)
    rank, world = _rank_world()
    problem, legacy = None, False
    try:
        files = read_manifest(path)
        if files is None and not named:
            problem = (f"it has no {MANIFEST} (deleted, or written before moetrain kept "
                       "checksums), so it cannot be verified; name this directory itself to "
                       "load it unverified")
        elif files is None:
            legacy = True
        else:
            problem = check_files(path, files, share(list(files), rank, world))
    except CheckpointInvalid as error:
        problem = str(error)
    except OSError as error:
        problem = f"{path}: {error.strerror}"
    problems = [p for p in _all_gather(problem) if p]
    if problems:
        raise CheckpointInvalid(f"checkpoint {path} failed verification: {problems[0]}")
    if legacy:
        _warn(f"checkpoint {path} has no {MANIFEST} (written before moetrain kept checksums): "
              "loading it unverified")


def resolve_resume(resume: str | None, run_dir: Path, field: str = "resume") -> Path | None:
    """Which checkpoint to load, verified. `auto`: the newest checkpoint of this run dir that
    passes verification (each one that fails is skipped with one warning naming its bad file;
    None if there is none); a path: that checkpoint, which must pass. Collective under a
    process group (call it on every rank)."""
    if not resume:
        return None
    if resume != "auto":
        path = checked_path(resume, field)
        verify_checkpoint(path)
        return path
    candidates = _broadcast(complete_checkpoints(checkpoint_dir(run_dir))
                            if _rank_world()[0] == 0 else None)
    first_error = None
    for path in reversed(candidates):
        try:
            verify_checkpoint(path, named=False)
            return path
        except CheckpointInvalid as error:
            first_error = first_error or error
            _warn(f"{field}=auto: {error}; trying an older checkpoint")
    if first_error is not None:
        raise CheckpointInvalid(f"{field}=auto: none of the {len(candidates)} checkpoints in "
                                f"{checkpoint_dir(run_dir)} passed verification (newest: "
                                f"{first_error}); move them away to start afresh")
    return None


def checked_path(value: str | Path, field: str = "resume") -> Path:
    """An explicitly named checkpoint must at least be a published checkpoint directory;
    cheap (no hashing, no collective), so every rank can check it before starting."""
    path = Path(value)
    if not (path.is_dir() and is_checkpoint(path)):
        valid = ("'auto' or a checkpoints/step_XXXXXXXX path" if field == "resume"
                 else "a checkpoints/step_XXXXXXXX path, or hf:DIR for a transformers one")
        raise ValueError(f"{field}={str(value)!r} is not a complete checkpoint directory (no "
                         f"{MANIFEST} or DCP .metadata); use {valid}")
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
    """A checkpoint directory as given, or the newest valid checkpoint of a run directory;
    verified either way (in this process alone, for the one-process tools)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{field}={str(path)!r} does not exist; name a run directory or one "
                         "of its checkpoints/step_XXXXXXXX")
    if path.is_dir() and is_checkpoint(path):
        verify_checkpoint(path)
        return path
    found = complete_checkpoints(checkpoint_dir(path), warn=False) if path.is_dir() else []
    if not found:
        raise ValueError(f"{field}={str(path)!r} is neither a checkpoint directory (with "
                         f"{MANIFEST} or DCP .metadata) nor a run directory with a complete "
                         "checkpoint under checkpoints/")
    return resolve_resume("auto", path, field=field)


def load_run_config(checkpoint: Path):
    """The resolved RunConfig saved beside a checkpoint. Its config.yaml is checked against
    the manifest first (one small file: cheap enough for the start-up checks that run before
    the whole checkpoint is verified), so that damage is reported as such, in one line."""
    from omegaconf import OmegaConf

    from moetrain.config import RunConfig
    checkpoint = Path(checkpoint)
    path = checkpoint / "config.yaml"
    files = read_manifest(checkpoint)
    problem = (check_files(checkpoint, files, ["config.yaml"])
               if files is not None and "config.yaml" in files else None)
    if problem is None and not path.is_file():
        problem = f"{path} is missing"
    if problem is not None:
        raise CheckpointInvalid(f"checkpoint {checkpoint} failed verification: {problem}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig),
                                                   OmegaConf.load(path)))
    except Exception as error:  # YAML or schema errors: several lines each
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointInvalid(f"{path} is not a moetrain run config "
                                f"({type(error).__name__}: {reason[:200]})") from None


def load_model(source: str | Path, device: str | torch.device = "cpu", merge: bool = True):
    """(model in eval mode with full tensors, RunConfig) in this one process, from a run or
    checkpoint directory written by any layout, or from `hf:DIR` (a transformers checkpoint).
    Built on the meta device and never initialised: every parameter and buffer is loaded.
    A LoRA run's checkpoint (adapters only) loads onto its base (the run's init_from), and
    the adapters are merged into the weights unless merge=False."""
    from moetrain.model import Transformer
    from moetrain.model.lora import apply_lora, merge_lora_, trainable_state_names
    if str(source).startswith("hf:"):
        from moetrain.hf import load_hf_model
        model, cfg = load_hf_model(str(source)[3:], device=device)
        return model.eval(), cfg
    checkpoint = find_checkpoint(source)
    cfg = load_run_config(checkpoint)
    lora = cfg.finetune.lora
    with torch.device("meta"):
        model = Transformer(cfg.model)
        if lora.enabled:
            apply_lora(model, lora)
    model.to_empty(device=device)
    model.init_buffers()
    if lora.enabled:
        load_lora_base(model, cfg.init_from, field=f"{checkpoint}'s init_from")
        load_model_weights(model, checkpoint, keys=trainable_state_names(model))
        if merge:
            merge_lora_(model)
    else:
        load_model_weights(model, checkpoint)
    return model.eval(), cfg


def load_lora_base(model, init_from: str | None, field: str = "init_from",
                   verified: bool = False) -> None:
    """The frozen base weights of a LoRA model: every non-adapter tensor, from a moetrain
    checkpoint (verified here unless `verified`) or `hf:DIR`."""
    from moetrain.model.lora import is_adapter
    if not init_from:
        raise ValueError(f"{field} is not set: a LoRA checkpoint holds only the adapters, "
                         "and its base is the run's init_from")
    if init_from.startswith("hf:"):
        from moetrain.hf.convert import load_hf_weights_
        load_hf_weights_(model, init_from[3:])
        return
    base = check_lora_base(init_from, field)
    if not verified:
        verify_checkpoint(base)
    load_model_weights(model, base, keys={k for k in model.state_dict() if not is_adapter(k)})


def check_lora_base(init_from: str, field: str = "init_from") -> Path:
    """A moetrain checkpoint whose weights can start a run, full or LoRA: not itself a LoRA
    checkpoint, which holds adapters only (cheap: no hashing, no collective)."""
    base = checked_path(init_from, field)
    if load_run_config(base).finetune.lora.enabled:
        raise ValueError(f"{field}={init_from!r} is itself a LoRA checkpoint; export it merged "
                         "(python -m moetrain.export CKPT --format hf --out DIR) and start "
                         "from init_from=hf:DIR")
    return base


def load_model_weights(model, checkpoint: Path, keys: set[str] | None = None) -> None:
    """Every parameter and persistent buffer of `model` (plain, or sharded by any layout), or
    only those named in `keys`, from a (verified) checkpoint's `model.*` tensors, strictly:
    the checkpoint holds exactly those. DCP reshards them to this layout."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()
             if keys is None or k in keys}
    load_strict(state, checkpoint, prefix="model.")


def load_strict(state: dict, path: Path, prefix: str = "") -> None:
    """DCP-load `state` in place after checking that the checkpoint's keys (those starting
    with `prefix`) are exactly these: never a model with some weights left at init."""
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as error:  # any failure to read it means the same thing to the user
        raise CheckpointInvalid(f"checkpoint {path}: {path / '.metadata'} cannot be read "
                                f"({type(error).__name__})") from None
    saved = {k for k in metadata.state_dict_metadata if k.startswith(prefix)}
    missing, unexpected = sorted(set(state) - saved), sorted(saved - set(state))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match this model: missing keys "
                         f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected "
                         f"keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for key, tensor in state.items():
        saved_meta = metadata.state_dict_metadata[key]
        size = getattr(saved_meta, "size", None)
        if size is not None and tuple(size) != tuple(tensor.shape):
            raise ValueError(f"checkpoint {path} does not match this model: {key} is "
                             f"{tuple(size)} there and {tuple(tensor.shape)} here (is the model "
                             "config the checkpoint's?)")
    try:
        with quiet_single_process():
            dcp.load(state, checkpoint_id=str(path))
    except Exception as error:
        # DCP's own message is every rank's traceback; verification has already passed, so
        # this is a checkpoint written before manifests or damaged in the last moments.
        raise CheckpointInvalid(f"checkpoint {path}: its tensor data cannot be read "
                                f"({type(error).__name__}); restore it or use an older "
                                "checkpoint") from None


def _read_extra(path: Path) -> dict:
    try:
        return torch.load(path, weights_only=True)
    except Exception as error:
        # torch's message advises weights_only=False, which would run arbitrary pickled code
        # from a file that has just failed to parse: never pass that advice on.
        raise CheckpointInvalid(f"{path} cannot be read ({type(error).__name__}); the "
                                "checkpoint is damaged") from None


class Checkpointer:
    """Saves and restores a run's state: the model and optimizer tensors (by logical name,
    resharded on load), the scheduler, learning rates, data position, RNG and the collapse
    detector. It holds those objects, not the loop; `load` returns the step to continue from."""

    def __init__(self, root: Path, model, optimizer, scheduler, data, detector=None,
                 keep_last: int = 0, model_keys: set[str] | None = None):
        self.root = Path(root)
        # which of the model's tensors to save: all (None), or a LoRA run's adapters and
        # buffers (its frozen base is its init_from)
        self.model_keys = model_keys
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.data, self.detector, self.keep_last = data, detector, keep_last

    # ---------------------------------------------------------------- tensors
    def _tensor_state(self) -> dict:
        """Every tensor to save or load into, keyed by logical name. Sharded parameters (expert
        blocks, FSDP shards) and their optimizer slots are DTensors of their logical shape, so
        DCP stores each tensor once and reshards it on load; nothing is gathered on a rank.
        Loading writes into these in place: they are the parameters and the optimizer state."""
        state = {f"model.{name}": tensor for name, tensor in self.model.state_dict().items()
                 if self.model_keys is None or name in self.model_keys}
        # Where AdamW keeps its step count: on the parameter's device for the fused (and
        # capturable) kernels, which refuse a CPU one; on the CPU otherwise. As torch does.
        step_on_device = any(group.get("fused") or group.get("capturable")
                             for group in self.optimizer.param_groups)
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            slots = self.optimizer.state[param]
            if not slots:  # before the first step: create AdamW's slots so they can be loaded
                slots.update(step=torch.zeros((), dtype=torch.float32,
                                              device=param.device if step_on_device else "cpu"),
                             exp_avg=torch.zeros_like(param),
                             exp_avg_sq=torch.zeros_like(param))
            state[f"optim.{name}.step"] = slots["step"]
            state[f"optim.{name}.exp_avg"] = slots["exp_avg"]
            state[f"optim.{name}.exp_avg_sq"] = slots["exp_avg_sq"]
        return state

    def _extra_state(self, step: int) -> dict:
        extra = {
            "step": step,
            "scheduler": self.scheduler.state_dict(),
            "lr": [group["lr"] for group in self.optimizer.param_groups],
            "data": self.data.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "detector": self.detector.state_dict() if self.detector is not None else None,
        }
        if torch.cuda.is_available():
            extra["rng_cuda"] = torch.cuda.get_rng_state()
        return extra

    # ---------------------------------------------------------------- save
    def save(self, step: int, config_yaml: str) -> Path:
        """Collective. Returns the published checkpoint directory."""
        rank, world = _rank_world()
        final = self.root / f"{PREFIX}{step:08d}"
        tmp = final.with_name(final.name + TMP_SUFFIX)
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        with quiet_single_process():
            dcp.save(self._tensor_state(), checkpoint_id=str(tmp))
        torch.save(self._extra_state(step), tmp / f"extra_rank{rank}.pt")
        if rank == 0:
            (tmp / "config.yaml").write_text(config_yaml)
        _barrier()  # every rank's files are in place
        names = _broadcast(sorted(p.name for p in tmp.iterdir() if p.is_file())
                           if rank == 0 else None)
        # Each rank hashes (and syncs to disk) its share, read back from the page cache.
        entries = {}
        for part in _all_gather({n: file_digest(tmp / n, sync=True)
                                 for n in share(names, rank, world)}):
            entries.update(part)
        if rank == 0:
            write_manifest(tmp, entries, step)
            if final.exists():  # re-saving the same step: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)  # atomic: the checkpoint appears complete or not at all
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for old in complete_checkpoints(self.root, warn=False)[:-self.keep_last]:
            shutil.rmtree(old)

    # ---------------------------------------------------------------- load
    def load_weights(self, path: Path) -> None:
        """Model weights and buffers (expert bias included) only, for a new run (init_from):
        the optimizer, schedule, data position and step start afresh. `path` is verified."""
        load_model_weights(self.model, path)

    def load(self, path: Path) -> int:
        """Restore everything from a verified checkpoint; returns its step."""
        load_strict(self._tensor_state(), path)
        extra = _read_extra(self._extra_path(Path(path)))
        self.scheduler.load_state_dict(extra["scheduler"])
        # The schedule is the run's (optim.lr, warmup, decay: what its config.yaml records),
        # at the checkpoint's step; unchanged settings give the saved rates bit for bit.
        scheduler = self.scheduler
        scheduler.base_lrs = [group["initial_lr"] for group in self.optimizer.param_groups]
        for group, base, factor in zip(self.optimizer.param_groups, scheduler.base_lrs,
                                       scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        self.data.load_state_dict(extra["data"])
        torch.set_rng_state(extra["rng_cpu"])
        if "rng_cuda" in extra and torch.cuda.is_available():
            torch.cuda.set_rng_state(extra["rng_cuda"])
        if self.detector is not None and extra["detector"] is not None:
            self.detector.load_state_dict(extra["detector"])
        return extra["step"]

    @staticmethod
    def _extra_path(path: Path) -> Path:
        """This rank's extras when the checkpoint was written by as many ranks as there are
        now; on another number of ranks, every rank takes rank 0's (layout-free) extras."""
        rank, world = _rank_world()
        listed = read_manifest(path) or {p.name: None for p in path.iterdir()}
        written = sum(1 for name in listed if _EXTRA.fullmatch(name))
        return path / f"extra_rank{rank if written == world else 0}.pt"


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
