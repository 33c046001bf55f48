"""Export a checkpoint: `python -m moetrain.export CKPT_OR_RUN_DIR [--format hf] --out DIR`.

    --format hf           a transformers checkpoint directory (config.json, sharded safetensors
                          with an index, generation_config.json, tokenizer) that
                          `AutoModelForCausalLM.from_pretrained(DIR)` loads with no code of ours:
                          MixtralForCausalLM, Glm4MoeForCausalLM (DeepSeek-V3 routing with GQA)
                          or LlamaForCausalLM (dense)
    --format safetensors  one model.safetensors under moetrain's own logical names
                          (layers.1.ffn.experts.w_gate, ...) plus config.yaml

CKPT_OR_RUN_DIR is a checkpoint directory or a run directory (its newest complete checkpoint),
written by any layout. Tensors stream one at a time from the checkpoint to the output. A LoRA
run's checkpoint (adapters only) is loaded onto its base (the run's init_from) and merged in
memory first: the export is the fine-tuned model, with the base's names and shapes.
A setting with no transformers equivalent, or an existing non-empty --out, fails with one line
before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from moetrain.checkpoint import find_checkpoint, is_checkpoint, load_run_config

FORMATS = ("hf", "safetensors")


def export_safetensors(source: str | Path, out: Path, dtype: str = "float32",
                       overwrite: bool = False) -> Path:
    """OUT/model.safetensors under logical names, and OUT/config.yaml (the model config)."""
    from moetrain.hf.convert import DTYPES, FP32_TENSORS, logical_tensor_reader, published
    from moetrain.hf.safetensors_io import Entry, write_file
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    checkpoint = find_checkpoint(source)
    cfg = load_run_config(checkpoint)
    read, shapes = logical_tensor_reader(checkpoint, cfg)
    entries = []
    for name, (size, stored) in shapes.items():
        if cfg.model.tie_embeddings and name == "output.weight":
            continue
        target = (torch.float32 if name.endswith(FP32_TENSORS)
                  or not stored.is_floating_point else DTYPES[dtype])
        entries.append(Entry(name, size, target,
                             lambda name=name, target=target: read(name).to(target)))
    with published(out, overwrite, checkpoint) as partial:
        write_file(partial / "model.safetensors", entries)
        (partial / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg.model)))
    return Path(out)


def default_out(source: Path, fmt: str) -> Path:
    """Inside a run directory; never inside a checkpoint, which keep_last may delete (nor in
    checkpoints/, where it would read as a partial checkpoint)."""
    if not is_checkpoint(source):
        return source / f"export-{fmt}"  # a run directory
    beside = source.parent.parent if source.parent.name == "checkpoints" else source.parent
    return beside / f"export-{fmt}-{source.name}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moetrain.export",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("source", metavar="CKPT_OR_RUN_DIR")
    parser.add_argument("--format", default="hf", help=f"one of {', '.join(FORMATS)}")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: RUN_DIR/export-FORMAT, or for a "
                             "checkpoint RUN_DIR/export-FORMAT-step_XXXXXXXX)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--max-shard-size", type=float, default=5.0,
                        help="GiB per safetensors file (hf format)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out (only once the export is complete)")
    args = parser.parse_args(argv)
    try:
        if args.format not in FORMATS:
            raise ValueError(f"--format {args.format!r} is not one of {', '.join(FORMATS)}")
        if args.max_shard_size <= 0:
            raise ValueError(f"--max-shard-size {args.max_shard_size} must be > 0 (GiB)")
        out = args.out or default_out(Path(args.source), args.format)
        if args.format == "hf":
            from moetrain.hf import export_hf
            written = export_hf(args.source, out, args.dtype,
                                int(args.max_shard_size * 2**30), args.overwrite)
        else:
            written = export_safetensors(args.source, out, args.dtype, args.overwrite)
    except ValueError as error:
        print(f"moetrain.export: error: {error}", file=sys.stderr, flush=True)
        return 2
    print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
