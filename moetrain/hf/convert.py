"""Conversion between moetrain checkpoints and transformers checkpoint directories.

Export reads a DCP checkpoint of any layout one tensor at a time (DCP reassembles expert and
FSDP shards into the logical tensor) and streams it into sharded safetensors under the family's
names, so the exporting process holds about one tensor. Import reads, for each parameter of a
model already built and parallelized, only the slice this rank holds (for stacked experts, only
its experts' files), so any layout starts from a transformers checkpoint without a rank ever
holding the whole model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from moetrain.checkpoint import (find_checkpoint, load_model, load_run_config,
                                 quiet_single_process)
from moetrain.config import DataConfig, ModelConfig, RunConfig
from moetrain.hf.families import (empty_tensors, family_for, hf_config, is_stacked,
                                  model_config_from_hf, to_hf_names)
from moetrain.hf.safetensors_io import Entry, ShardedReader, write_sharded
from moetrain.hf.tokenizer import tokenizer_setting, write_tokenizer
from moetrain.model import Transformer
from moetrain.model.init import local_region
from moetrain.model.lora import is_adapter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Kept in fp32 whatever the export dtype, as transformers keeps it (a selection bias of ~1e-3
# steps would round away in bf16).
FP32_TENSORS = ("router.expert_bias",)


def logical_tensor_reader(checkpoint: Path, cfg: RunConfig):
    """(read, shapes): read(name) -> the full logical tensor of the model's `name`, and
    shapes[name] = (size, dtype) for every model tensor. A plain checkpoint is read from DCP one
    tensor at a time; a LoRA run's checkpoint (adapters only) is loaded onto its base and
    merged in memory first, so what is exported is the fine-tuned model."""
    if cfg.finetune.lora.enabled:
        model, _ = load_model(checkpoint)  # merged
        state = {k: v.detach() for k, v in model.state_dict().items()}
        return state.__getitem__, {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    shapes = {}
    for key, meta in metadata.items():
        if key.startswith("model."):
            assert isinstance(meta, TensorStorageMetadata)
            shapes[key[len("model."):]] = (tuple(meta.size), meta.properties.dtype)

    def read(name: str) -> torch.Tensor:
        tensor = torch.empty(shapes[name][0], dtype=shapes[name][1])
        with quiet_single_process():
            dcp.load({f"model.{name}": tensor}, checkpoint_id=str(checkpoint))
        return tensor

    return read, shapes


def export_hf(source: str | Path, out: Path, dtype: str = "float32",
              max_shard_size: int = 5 * 2**30, overwrite: bool = False) -> Path:
    """Write a transformers checkpoint directory for the newest checkpoint of a run (or a
    checkpoint directory). Every check runs before anything is written; the directory appears
    complete or not at all."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    checkpoint = find_checkpoint(source)
    cfg = load_run_config(checkpoint)
    from moetrain.data.tokenizer import build_tokenizer
    eos_id = build_tokenizer(cfg.data.tokenizer).eos_id
    config = hf_config(cfg.model, eos_id)  # raises for a setting with no equivalent
    with published(out, overwrite, checkpoint) as partial:
        _write_hf(checkpoint, cfg, config, eos_id, partial, dtype, max_shard_size)
    return Path(out)


@contextlib.contextmanager
def published(out: str | Path, overwrite: bool, source: Path):
    """Yield a sibling `OUT.partial` to write into; OUT appears once it is complete. A
    non-empty OUT is only replaced with `overwrite` (checked first), and never when it holds
    `source`, the checkpoint being read, nor is OUT ever inside it; a failed write leaves OUT
    as it was."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a directory")
    resolved, source_dir = out.resolve(), Path(source).resolve()
    if resolved == source_dir or resolved in source_dir.parents:
        raise ValueError(f"--out {str(out)!r} holds the checkpoint being exported ({source}); "
                         "choose a directory outside it")
    if source_dir in resolved.parents:
        raise ValueError(f"--out {str(out)!r} is inside the checkpoint being exported "
                         f"({source}), which checkpoint.keep_last may delete; choose a "
                         "directory outside it")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {str(out)!r} exists and is not empty; choose a new directory "
                         "or pass --overwrite")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)


def _write_hf(checkpoint: Path, cfg: RunConfig, config: dict, eos_id: int, partial: Path,
              dtype: str, max_shard_size: int) -> None:
    family = family_for(cfg.model)
    read, shapes = logical_tensor_reader(checkpoint, cfg)
    with torch.device("meta"):
        names = list(Transformer(cfg.model).state_dict())  # the model's own order
    if cfg.model.tie_embeddings:
        names.remove("output.weight")  # transformers ties lm_head to the embedding itself
    num_experts = cfg.model.moe.num_experts if cfg.model.moe is not None else 0
    entries, cache = [], {}

    def fetch(name: str, expert: int | None, target: torch.dtype):
        def get() -> torch.Tensor:
            if cache.get("name") != name:  # one logical tensor in memory at a time
                cache.clear()
                cache.update(name=name, tensor=read(name))
            tensor = cache["tensor"]
            return (tensor[expert] if expert is not None else tensor).to(target)
        return get

    for name in names:
        size, stored = shapes[name]
        target = (torch.float32 if name.endswith(FP32_TENSORS) or not stored.is_floating_point
                  else DTYPES[dtype])
        hf_names = to_hf_names(family, name, num_experts)
        stacked = is_stacked(family, name)
        shape = size[1:] if stacked else size
        for expert, hf_name in enumerate(hf_names):
            entries.append(Entry(hf_name, shape, target,
                                 fetch(name, expert if stacked else None, target)))
    for hf_name, shape in empty_tensors(cfg.model).items():
        entries.append(Entry(hf_name, shape, DTYPES[dtype],
                             lambda shape=shape: torch.empty(shape, dtype=DTYPES[dtype])))
    write_sharded(partial, entries, max_shard_size)

    config["dtype"] = config["torch_dtype"] = dtype  # the name transformers 5 / 4 reads
    (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"eos_token_id": eos_id, "pad_token_id": eos_id, "bos_token_id": None}
    (partial / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_tokenizer(cfg.data.tokenizer, partial, cfg.model.max_seq_len)


# --------------------------------------------------------------------------- import
def read_hf_config(directory: str | Path, field: str = "init_from") -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ValueError(f"{field}=hf:{directory}: no config.json there; expected a local "
                         "transformers checkpoint directory")
    return json.loads(path.read_text())


def import_model_config(directory: str | Path, keep: ModelConfig | None = None) -> ModelConfig:
    """moetrain's model config for a transformers checkpoint. `keep`: the run's own config,
    whose training-only settings (balancing, router jitter and freezing, capacity) win over
    any that a checkpoint exported by moetrain carries."""
    config = read_hf_config(directory)
    model = model_config_from_hf(config)
    if model.tie_embeddings and _stores_its_own_head(directory):
        model.tie_embeddings = False  # as transformers does: it keeps such a head untied
    if keep is not None:
        model.balance = keep.balance
        if model.moe is not None and keep.moe is not None:
            model.moe.router_jitter = keep.moe.router_jitter
            model.moe.freeze_router = keep.moe.freeze_router
            model.moe.capacity_factor = keep.moe.capacity_factor
    model.validate()
    return model


@torch.no_grad()
def load_hf_weights_(model: Transformer, directory: str | Path) -> None:
    """Fill every parameter and persistent buffer of `model` (plain, or sharded by any layout)
    from a transformers checkpoint directory; missing or unexpected tensors raise."""
    directory = Path(directory)
    family = family_for(model.cfg)
    reader = ShardedReader(directory)
    available = reader.names()
    # a LoRA model's adapters are not in a base checkpoint
    state = {k: v for k, v in model.state_dict().items() if not is_adapter(k)}
    if model.cfg.tie_embeddings:
        state.pop("output.weight")
    num_experts = model.cfg.moe.num_experts if model.cfg.moe is not None else 0
    plan = {name: to_hf_names(family, name, num_experts) for name in state}
    wanted = {n for names in plan.values() for n in names}
    missing = sorted(wanted - available)
    empty = empty_tensors(model.cfg)
    unexpected = sorted(n for n in available - wanted
                        if not (_ignorable(n, model.cfg) or n in empty))
    if missing or unexpected:
        raise ValueError(f"hf:{directory} does not match its config.json: missing tensors "
                         f"{missing[:6]}{' ...' if len(missing) > 6 else ''}, unexpected "
                         f"{unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    for name, tensor in state.items():
        local, shape, offset = local_region(tensor)
        if local.numel() == 0:
            continue
        region = tuple(slice(o, o + n) for o, n in zip(offset, shape))
        hf_names = plan[name]
        if is_stacked(family, name):  # read only this rank's experts
            for row, expert in enumerate(range(region[0].start, region[0].stop)):
                local[row].copy_(reader.read(hf_names[expert], region[1:]))
        else:
            local.copy_(reader.read(hf_names[0], region))


def _stores_its_own_head(directory: str | Path) -> bool:
    """True if the weights hold an lm_head that differs from the embeddings (an equal one is
    the tied head, saved twice)."""
    try:
        reader = ShardedReader(Path(directory))
    except ValueError:  # no weights (yet): loading them says so
        return False
    if "lm_head.weight" not in reader.names():
        return False
    return not torch.equal(reader.read("lm_head.weight"),
                           reader.read("model.embed_tokens.weight"))


def _ignorable(name: str, cfg: ModelConfig) -> bool:
    """Tensors transformers itself skips on load: GLM's multi-token-prediction layers (after
    the last layer), and a stored lm_head when the embeddings are tied (equal to them:
    `import_model_config` unties a model whose stored head differs)."""
    if name == "lm_head.weight" and cfg.tie_embeddings:
        return True
    parts = name.split(".")
    return (len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit()
            and int(parts[2]) >= cfg.n_layers)


def load_hf_model(directory: str | Path, device: str | torch.device = "cpu"):
    """(model with the checkpoint's weights, RunConfig) for one process."""
    directory = Path(directory)
    model_cfg = import_model_config(directory)
    tokenizer = tokenizer_setting(directory) or "byte"
    # no training data to take seq_len from: the default, where the model's context allows it
    seq_len = min(DataConfig().seq_len, model_cfg.max_seq_len)
    cfg = RunConfig(model=model_cfg, data=DataConfig(tokenizer=tokenizer, seq_len=seq_len))
    with torch.device("meta"):
        model = Transformer(model_cfg)
    model.to_empty(device=device)
    model.init_buffers()
    load_hf_weights_(model, directory)
    return model, cfg
