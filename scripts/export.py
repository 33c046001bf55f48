"""Export a run's checkpoint as one consolidated safetensors file plus its config.

    .venv/bin/python scripts/export.py RUN_DIR [--checkpoint PATH] [--out DIR]

Reads the newest complete checkpoint (or --checkpoint) in one process, whatever layout wrote
it: DCP reassembles expert shards into their logical (E, ...) tensors. Writes
OUT/model.safetensors (logical names, e.g. layers.1.ffn.experts.w_gate) and OUT/config.yaml
(default OUT: RUN_DIR/export).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from safetensors.torch import save_model

from moetrain.checkpoint import checkpoint_dir, complete_checkpoints
from moetrain.config import RunConfig
from moetrain.model import Transformer


def export(run_dir: Path, checkpoint: Path | None, out: Path) -> Path:
    if checkpoint is None:
        found = complete_checkpoints(checkpoint_dir(run_dir))
        if not found:
            raise SystemExit(f"export: no complete checkpoint under {checkpoint_dir(run_dir)}")
        checkpoint = found[-1]
    cfg: RunConfig = OmegaConf.to_object(OmegaConf.merge(
        OmegaConf.structured(RunConfig), OmegaConf.load(checkpoint / "config.yaml")))
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model.to_empty(device="cpu")  # no init: DCP overwrites every parameter and saved buffer
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    dcp.load(state, checkpoint_id=str(checkpoint))  # one process: full logical tensors
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / "model.safetensors"))  # handles tied embeddings
    (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg.model)))
    return out / "model.safetensors"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    print(export(args.run_dir, args.checkpoint, args.out or args.run_dir / "export"))


if __name__ == "__main__":
    sys.exit(main())
