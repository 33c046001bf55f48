"""What checkpoint verification costs next to the save itself, in one process.

    .venv/bin/python scripts/bench_checkpoint.py [--model deepseek_small] [--repeats 3]

Saves the model and its AdamW state (a training checkpoint: weights plus two moments) with
moetrain's Checkpointer, then times, in the same run:
  save        the whole save (DCP write, extras, SHA-256 + fsync of every file, manifest)
  hash+sync   the manifest's share of it (every file re-read from the page cache and synced)
  verify      what a resume adds before loading (size check, SHA-256 of every file)
  load        the DCP load into the live tensors, for scale
Medians of the repeats; under N ranks each rank hashes 1/N of the files, at save and at load.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moetrain import integrity
from moetrain.checkpoint import Checkpointer, load_strict, verify_checkpoint
from moetrain.model import Transformer
from moetrain.optim import build_optimizer
from moetrain.config import OptimConfig
from moetrain.parallel.memory import format_bytes
from moetrain.presets import shipped_model


class NoData:
    def state_dict(self) -> dict:
        return {}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deepseek_small")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = Transformer(shipped_model(args.model))
    optimizer, scheduler = build_optimizer(model, OptimConfig(), 10)
    hashing = []
    digest = integrity.file_digest

    def timed_digest(path, sync=False):
        start = time.perf_counter()
        out = digest(path, sync=sync)
        hashing[-1] += time.perf_counter() - start
        return out

    integrity.file_digest = timed_digest  # the Checkpointer's own calls, timed
    import moetrain.checkpoint as checkpoint_module
    checkpoint_module.file_digest = timed_digest
    times = {"save": [], "hash+sync": [], "verify": [], "load": []}
    with tempfile.TemporaryDirectory(dir=".") as root:
        saver = Checkpointer(Path(root), model, optimizer, scheduler, NoData())
        for repeat in range(args.repeats):
            hashing.append(0.0)
            start = time.perf_counter()
            path = saver.save(repeat + 1, "{}\n")
            times["save"].append(time.perf_counter() - start)
            times["hash+sync"].append(hashing[-1])
            start = time.perf_counter()
            verify_checkpoint(path)
            times["verify"].append(time.perf_counter() - start)
            start = time.perf_counter()
            load_strict(saver._tensor_state(), path)
            times["load"].append(time.perf_counter() - start)
        size = sum(p.stat().st_size for p in path.iterdir())
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {args.model}: checkpoint {format_bytes(size)} (weights + AdamW moments), "
          f"{args.repeats} repeats, medians")
    for key, value in median.items():
        print(f"  {key:<10} {value:7.3f} s   {size / value / 2**30:6.2f} GiB/s")
    print(f"verify / save = {median['verify'] / median['save']:.2f}; "
          f"verify / load = {median['verify'] / median['load']:.2f}; "
          f"hash+sync / save = {median['hash+sync'] / median['save']:.2f}")


if __name__ == "__main__":
    main()
