"""Start-up of a training run: the config checks that need no collective, the ranks, the run
directory, and the model built and parallelized for this rank."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist

from moetrain.config import RunConfig
from moetrain.data.tokenizer import builtin_tokenizers, same_tokenizer
from moetrain.hf.convert import import_model_config
from moetrain.hf.tokenizer import tokenizer_setting
from moetrain.model import Transformer, num_params
from moetrain.model.lora import apply_lora
from moetrain.parallel import build_mesh, init_distributed, parallelize
from moetrain.parallel.memory import format_bytes, state_bytes_per_rank


def world_size_from_env() -> int:
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"WORLD_SIZE={value!r} must be an integer >= 1 (the number of ranks)")
    return int(value)


def apply_init_from_hf(cfg: RunConfig) -> str | None:
    """With init_from=hf:DIR, the model's architecture and, when DIR has one, its tokenizer
    (the embeddings are per its token ids, whatever the data config names) come from that
    transformers checkpoint; returns DIR, or None for any other init_from."""
    if not (cfg.init_from and cfg.init_from.startswith("hf:")):
        return None
    hf_dir = cfg.init_from[3:]
    cfg.model = import_model_config(hf_dir, keep=cfg.model)
    theirs, ours = tokenizer_setting(hf_dir), cfg.data.tokenizer
    if theirs is not None and not same_tokenizer(theirs, ours):
        cfg.data.tokenizer = theirs
        print(f"init_from=hf:{hf_dir}: using its tokenizer (data.tokenizer={theirs}), "
              f"not data.tokenizer={ours}", flush=True)
    return hf_dir


def record_absolute_paths(cfg: RunConfig) -> None:
    """Relative paths of the run's inputs (tokenizer, local data, init_from) made absolute,
    once they are read: config.yaml then names them from anywhere, for resume, generate,
    export and evaluate run from another directory."""
    data = cfg.data
    if data.tokenizer not in ("byte", *builtin_tokenizers()):
        data.tokenizer = os.path.abspath(data.tokenizer)
    if data.source in ("text", "json", "parquet"):
        data.path = os.path.abspath(data.path)
        if data.val_path:
            data.val_path = os.path.abspath(data.val_path)
    if cfg.init_from:
        cfg.init_from = _init_from_path(cfg.init_from, os.path.abspath)


def _init_from_path(init_from: str, normalise) -> str:
    """init_from with its path (after any `hf:`) passed through `normalise`."""
    hf = init_from.startswith("hf:")
    path = str(normalise(init_from[3:] if hf else init_from))
    return f"hf:{path}" if hf else path


def check_same_lora_base(cfg: RunConfig, saved: RunConfig, checkpoint: Path) -> None:
    """A LoRA run resumes on the base its adapters were trained on (one line if not); a
    changed alpha (which rescales every trained adapter) is named."""
    def where(init_from: str | None) -> str | None:
        return _init_from_path(init_from, lambda p: Path(p).resolve()) if init_from else None

    if where(cfg.init_from) != where(saved.init_from):
        raise ValueError(f"resume={str(checkpoint)!r} trained its adapters on "
                         f"init_from={saved.init_from!r}, not on init_from={cfg.init_from!r}; "
                         f"resume with init_from={saved.init_from}")
    ours, theirs = cfg.finetune.lora, saved.finetune.lora
    if ours.alpha != theirs.alpha and int(os.environ.get("RANK", "0")) == 0:
        print(f"WARNING: finetune.lora.alpha={ours.alpha} rescales adapters trained with "
              f"alpha {theirs.alpha} (scaling {theirs.scaling:g} -> {ours.scaling:g})",
              flush=True)


def check_same_tokenizer(cfg: RunConfig, base: RunConfig, field: str = "init_from",
                         checkpoint: str | None = None) -> None:
    """A run starting from (or resuming) a moetrain checkpoint reads text with that
    checkpoint's tokenizer (its embeddings are per token id); one line saying how."""
    ours, theirs = cfg.data.tokenizer, base.data.tokenizer
    if same_tokenizer(ours, theirs):
        return
    raise ValueError(
        f"{field}={checkpoint or cfg.init_from!r} was trained with data.tokenizer={theirs!r} "
        f"(model.vocab_size={base.model.vocab_size}), this run has data.tokenizer={ours!r} "
        f"(model.vocab_size={cfg.model.vocab_size}); keep the checkpoint's: add "
        f"data.tokenizer={theirs} model.vocab_size={base.model.vocab_size}")


def describe(cfg: RunConfig, model: Transformer, world: int) -> str:
    counts = num_params(model)
    lines = [f"parameters: {counts['total']:,} total, {counts['active']:,} active per token"]
    lora = cfg.finetune.lora
    if lora.enabled:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lines.append(f"LoRA rank {lora.rank} (alpha {lora.alpha:g}) on "
                     f"{', '.join(lora.targets)}: {trainable:,} trainable "
                     f"({100 * trainable / counts['total']:.2f}%), the rest frozen"
                     + ("; router trained" if lora.train_router else "; router frozen"))
    moe = cfg.model.moe
    if moe is not None:
        ep = cfg.parallel.ep
        lines.append(f"experts: {moe.num_experts} per MoE layer x {len(cfg.model.moe_layers)} "
                     f"layers, top-{moe.top_k}, {moe.num_experts // ep} per rank")
    else:
        lines.append("experts: none (dense model)")
    par = cfg.parallel
    kind = "none (one process)" if world == 1 else par.data_parallel
    if world > 1 and par.data_parallel == "fsdp" and par.dp_replicate > 1:
        kind = f"hsdp ({par.dp_replicate} replicas x {world // par.dp_replicate} shards)"
    lines.append(f"mesh: world {world} = ep {par.ep} x edp {world // par.ep}; "
                 f"data parallel: {kind}")
    state = state_bytes_per_rank(model, par, world)
    lines.append("per rank (fp32): " + ", ".join(f"{name} {format_bytes(size)}"
                                                  for name, size in state.items())
                 + f"; total {format_bytes(sum(state.values()))} before activations")
    return "\n".join(lines)


def dry_run(cfg: RunConfig) -> dict:
    """Build on the meta device (no memory, any size) and report sizes and layout."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
        if cfg.finetune.lora.enabled:
            apply_lora(model, cfg.finetune.lora)
    print(describe(cfg, model, world_size_from_env()), flush=True)
    return num_params(model)


@dataclass
class Ranks:
    rank: int
    world: int
    distributed: bool  # a process group exists (also for a torchrun job of one rank)
    device: torch.device

    def broadcast(self, value):
        """Rank 0's value on every rank."""
        if self.distributed and self.world > 1:
            box = [value]
            dist.broadcast_object_list(box, src=0)
            return box[0]
        return value


def join_ranks(cfg: RunConfig) -> Ranks:
    world = world_size_from_env()
    distributed = world > 1 or "MASTER_ADDR" in os.environ
    rank, world = init_distributed(cfg.parallel.timeout_s) if distributed else (0, 1)
    device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
              else torch.device("cpu"))
    return Ranks(rank, world, distributed, device)


def check_run_dir(path: str | Path) -> None:
    """A run directory that cannot be created fails here, in one line, before any work."""
    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"run_dir={str(path)!r} cannot be created: {parent} is a "
                                 "file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK) and parent != path:
                raise ValueError(f"run_dir={str(path)!r} cannot be created: {parent} is not "
                                 "writable")
            return


# What a run writes into its run_dir that a second run would overwrite or append to.
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "checkpoints")


def check_new_run_dir(path: str | Path) -> None:
    """A new run (no resume) must not start in another run's directory: its checkpoints would
    replace that run's at the same steps, and its records mix into that run's metrics."""
    held = [name for name in RUN_OUTPUTS if (Path(path) / name).exists()]
    if held:
        raise ValueError(f"run_dir={str(path)!r} already holds a run ({', '.join(held)}); "
                         "continue it with resume=auto, or choose another run_dir")


def new_dated_dir(parent: Path, name: str) -> Path:
    """parent/name-<date>-<time>, created here: a run started in the same second by someone
    else gets a -2, -3, ... of its own, never the other's directory."""
    base = f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    for n in itertools.count(1):
        path = parent / (base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue


def choose_run_dir(cfg: RunConfig, ranks: Ranks) -> Path:
    """Rank 0 decides and creates it; the others receive the same path (or the same error)."""
    path, error = None, None
    if ranks.rank == 0:
        path = cfg.run_dir
        try:
            if path is None:
                path = str(new_dated_dir(Path("runs"), cfg.name))
            check_run_dir(path)
            Path(path).mkdir(parents=True, exist_ok=True)
        except ValueError as bad:
            error = str(bad)
        except OSError as bad:
            error = f"run_dir={str(path or 'runs')!r} cannot be created: {bad.strerror}"
    path, error = ranks.broadcast((path, error))
    if error:
        raise ValueError(error)
    return Path(path)


def build_model(cfg: RunConfig, ranks: Ranks):
    """(model, module, mesh): the plain model (parameters, possibly DTensors) and the module
    to call (wrapped for data parallelism). Built on the meta device; parallelize
    materialises only this rank's shards, with the weights one process would have for this
    seed."""
    torch.manual_seed(cfg.train.seed)  # the same router-jitter stream on every rank
    mesh = None
    if ranks.distributed:
        mesh = build_mesh(cfg.parallel, cfg.model.moe.num_experts if cfg.model.moe else None)
    with torch.device("meta"):
        model = Transformer(cfg.model)
        if cfg.finetune.lora.enabled:  # adapters first: parallelize shards them with experts
            apply_lora(model, cfg.finetune.lora)
    fsdp = ranks.world > 1 and cfg.parallel.data_parallel == "fsdp"
    module = parallelize(
        model, mesh, cfg.parallel, device=ranks.device, seed=cfg.train.seed,
        activation_checkpointing=cfg.train.activation_checkpointing == "full",
        compile=cfg.train.compile, mixed_precision=fsdp and ranks.device.type == "cuda")
    return model, module, mesh
