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

import torch

from moetrain.train import Trainer
from moetrain.train.cli import config_from_overrides

SHIPPED_BALANCE = {"deepseek_tiny": "aux_free", "mixtral_tiny": "switch_aux",
                   "dense_tiny": "none"}


def common_and_spread(x: torch.Tensor) -> tuple[float, float]:
    """x (N, D) -> (norm of the mean row, mean norm of each row minus the mean row)."""
    mean = x.mean(dim=0)
    return mean.norm().item(), (x - mean).norm(dim=-1).mean().item()


def mean_pairwise_cosine(x: torch.Tensor) -> float:
    """Mean cosine over all ordered pairs of rows of x (N, D), self-pairs included: the
    squared norm of the mean unit row."""
    unit = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    return unit.mean(dim=0).norm().item() ** 2


@torch.no_grad()
def residual_report(model, tokens: torch.Tensor) -> list[dict]:
    """One eval-mode forward of tokens (B, T); per layer: attention's and the FFN's
    common/spread and the FFN input's mean pairwise cosine."""
    captured: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, out):
            out = out[0] if isinstance(out, tuple) else out  # an MoE returns (out, aux)
            captured[name] = out.detach().flatten(0, -2).float()
        return hook

    hooks = []
    for i, block in enumerate(model.layers):
        hooks += [block.attn.register_forward_hook(keep(f"attn{i}")),
                  block.ffn_norm.register_forward_hook(keep(f"ffn_in{i}")),
                  block.ffn.register_forward_hook(keep(f"ffn{i}"))]
    was_training = model.training
    model.eval()
    try:
        model(tokens)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return [{"layer": i, "moe": block.is_moe,
             "attn": common_and_spread(captured[f"attn{i}"]),
             "ffn": common_and_spread(captured[f"ffn{i}"]),
             "ffn_input_cosine": mean_pairwise_cosine(captured[f"ffn_in{i}"])}
            for i, block in enumerate(model.layers)]


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
    parser.add_argument("--run-dir", default="runs/probe_residual")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (after the defaults)")
    args = parser.parse_args(argv)
    if min(args.at) < 1:
        parser.error(f"--at {min(args.at)}: report steps start at 1")
    cfg = config_from_overrides([
        f"model={args.family}", f"balance={SHIPPED_BALANCE[args.family]}", "data=python_stdlib",
        "train.steps=300", "train.grad_accum=2", "logger=none", "logger.plots=false",
        "train.val_every=0", "checkpoint.at_end=false", "checkpoint.on_preempt=false",
        f"train.seed={args.seed}", f"run_dir={args.run_dir}",
        f"train.exit_at_step={max(args.at)}", *args.overrides])
    if max(args.at) > cfg.train.steps:
        parser.error(f"--at {max(args.at)} is past train.steps={cfg.train.steps}")
    trainer = ProbedTrainer(cfg, args.at)
    trainer.fit()
    return trainer.reports


if __name__ == "__main__":
    main()
