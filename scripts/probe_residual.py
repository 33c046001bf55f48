"""What do the blocks write into the residual stream in the first steps, and how alike are the
router's inputs? Trains one run in this process and, at the chosen steps, passes one fixed
batch (the first training batch) through the model in eval mode.

    .venv/bin/python scripts/probe_residual.py [--family deepseek_tiny] [--seed 0]
        [--at 10 20 30 50 100] [-- hydra overrides]

Defaults: data=python_stdlib, the family's shipped balancing, the learning-rate schedule of a
300-step run, the global batch of 2 ranks (train.grad_accum=2); the run stops after the last
--at step. For each report step and layer: the norm of the mean over the batch's tokens
("common") and the mean norm of each token's deviation from that mean ("spread") of what
attention and the FFN add to the residual stream, and the mean pairwise cosine of the FFN's
input (the router's input in an MoE layer; 1.0 means every token looks the same to it).
"""

from __future__ import annotations

import argparse
import tempfile

from moetrain.presets import SHIPPED_BALANCE
from moetrain.probes import residual_report
from moetrain.train import Trainer
from moetrain.train.cli import config_from_overrides


class ProbedTrainer(Trainer):
    """Reports after the optimizer steps in `at`, on the first training batch."""

    def __init__(self, cfg, at: list[int]):
        super().__init__(cfg)
        self.at, self.batch, self.reports = set(at), None, {}
        self.model.register_forward_pre_hook(self._keep_first_batch)

    def _keep_first_batch(self, module, args):
        if self.batch is None:
            self.batch = args[0].detach().clone()

    def train_step(self) -> dict:
        out = super().train_step()
        step = self.step + 1  # fit() counts the step after train_step returns
        if step in self.at:
            self.reports[step] = residual_report(self.model, self.batch)
            print_report(step, self.reports[step])
        return out


def print_report(step: int, rows: list[dict]) -> None:
    print(f"step {step}: layer | attention common / spread | FFN common / spread | "
          "FFN-input cosine", flush=True)
    for row in rows:
        kind = "MoE" if row["moe"] else "dense"
        print(f"  {row['layer']} ({kind}) | {row['attn'][0]:8.1f} / {row['attn'][1]:6.1f} | "
              f"{row['ffn'][0]:8.1f} / {row['ffn'][1]:6.1f} | {row['ffn_input_cosine']:.3f}",
              flush=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="deepseek_tiny", choices=sorted(SHIPPED_BALANCE))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--at", type=int, nargs="+", default=[10, 20, 30, 50, 100])
    parser.add_argument("--run-dir", default=None,
                        help="keep the run here (default: a temporary directory, removed)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (after the defaults)")
    args = parser.parse_args(argv)
    if min(args.at) < 1:
        parser.error(f"--at {min(args.at)}: report steps start at 1")
    with tempfile.TemporaryDirectory() as scratch:
        cfg = config_from_overrides([
            f"model={args.family}", f"balance={SHIPPED_BALANCE[args.family]}",
            "data=python_stdlib", "train.steps=300", "train.grad_accum=2", "logger=none",
            "logger.plots=false", "train.val_every=0", "checkpoint.at_end=false",
            "checkpoint.on_preempt=false", f"train.seed={args.seed}",
            f"run_dir={args.run_dir or scratch}", f"train.exit_at_step={max(args.at)}",
            *args.overrides])
        if max(args.at) > cfg.train.steps:
            parser.error(f"--at {max(args.at)} is past train.steps={cfg.train.steps}")
        trainer = ProbedTrainer(cfg, args.at)
        trainer.fit()
        return trainer.reports


if __name__ == "__main__":
    main()
