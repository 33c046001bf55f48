"""Training: `python -m moetrain.train [hydra overrides]`, or a Trainer from Python.

  setup.py       config checks, ranks, run directory, the model built for this rank
  loop.py        the Trainer: one step, validation, the loop, logging and checkpoint cadence
  throughput.py  tokens/s and MFU
  preemption.py  clean stops on SIGTERM/SIGINT/SIGUSR1
  cli.py         the Hydra entry point and the checks a launcher runs before any rank starts
The loss is moetrain.loss, checkpoints moetrain.checkpoint, logging moetrain.loggers.
"""

from moetrain.train.cli import run
from moetrain.train.loop import Trainer, TrainingStopped
from moetrain.train.preemption import Preempted
from moetrain.train.setup import apply_init_from_hf, dry_run, world_size_from_env

__all__ = ["Preempted", "Trainer", "TrainingStopped", "apply_init_from_hf", "dry_run", "run",
           "world_size_from_env"]
