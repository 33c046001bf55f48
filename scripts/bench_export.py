"""Peak memory of `moetrain.export --format hf` against the model's size and its largest tensor.

    .venv/bin/python scripts/bench_export.py [--model deepseek_small] [--dtype float32]

Writes a one-process DCP checkpoint of a freshly initialised model from configs/model/ (no
training: only the bytes matter), then exports it in a child process and reads the child's
peak resident memory. Streaming holds about one logical tensor (a layer's stacked experts);
a whole-model export would hold the model.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf

from moetrain.config import RunConfig
from moetrain.model import Transformer
from moetrain.parallel.memory import format_bytes
from moetrain.presets import shipped_model


def write_checkpoint(model_name: str, root: Path) -> tuple[int, int]:
    model_cfg = shipped_model(model_name)
    model = Transformer(model_cfg)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    checkpoint = root / "checkpoints" / "step_00000001"
    dcp.save(state, checkpoint_id=str(checkpoint))
    (checkpoint / "config.yaml").write_text(
        OmegaConf.to_yaml(OmegaConf.structured(RunConfig(model=model_cfg))))
    sizes = [t.numel() * t.element_size() for t in model.state_dict().values()]
    return sum(sizes), max(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deepseek_small")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_bytes, largest = write_checkpoint(args.model, root)
        # One child: its peak after the imports, then after the export.
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (which
        # holds the model here) across exec.
        code = ("import re, sys, moetrain.export, moetrain.hf, torch\n"
                "peak = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', "
                "open('/proc/self/status').read()).group(1))\n"
                "before = peak()\n"
                "assert moetrain.export.main(sys.argv[1:]) == 0\n"
                "print(before, peak())")
        start = time.perf_counter()
        child = subprocess.run([sys.executable, "-c", code, str(root), "--out",
                                str(root / "hf"), "--dtype", args.dtype],
                               capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - start
        base_kib, peak_kib = map(int, child.stdout.split()[-2:])
        written = sum(f.stat().st_size for f in (root / "hf").iterdir())
    above = (peak_kib - base_kib) * 1024
    print(f"model {args.model}: {format_bytes(model_bytes)} of tensors, largest "
          f"{format_bytes(largest)}; export wrote {format_bytes(written)} in {seconds:.1f} s")
    print(f"export peak RSS {format_bytes(peak_kib * 1024)}, of which above the imports "
          f"({format_bytes(base_kib * 1024)}): {format_bytes(above)} = "
          f"{above / largest:.2f}x the largest tensor, {above / model_bytes:.2f}x the model")


if __name__ == "__main__":
    main()
