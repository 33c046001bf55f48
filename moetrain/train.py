"""Entry point: `python -m moetrain.train [hydra overrides]` (or `moetrain-train`).

Thin on purpose: Hydra composes configs/ over the typed schema in moetrain.config; the
Trainer does the rest. A bad config or bad data ends the run with one line on stderr and
exit code 2, on every rank, before any collective.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch.distributed as dist
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from moetrain.config import RunConfig

ConfigStore.instance().store(name="train_schema", node=RunConfig)
# Absolute: Hydra resolves a relative path against the module when this file is not __main__
# (the `moetrain-train` console script), where "../configs" is not a package. The configs live
# in the repository, which `pip install -e` (scripts/setup.sh) keeps in place.
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(dict_cfg: DictConfig) -> None:
    from moetrain.trainer import (Trainer, TrainingStopped, apply_init_from_hf, dry_run,
                                  world_size_from_env)

    cfg: RunConfig = OmegaConf.to_object(dict_cfg)
    if cfg.name == RunConfig.name:
        cfg.name = _name_from_choices()
    try:
        if cfg.dry_run:  # the layout of WORLD_SIZE ranks (1 if unset), without starting them
            apply_init_from_hf(cfg)
            cfg.validate(world_size_from_env())
            dry_run(cfg)
            return
        Trainer(cfg).fit()
    except ValueError as error:
        print(f"moetrain: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except TrainingStopped as stop:
        print(f"moetrain: stopped: {stop}", file=sys.stderr, flush=True)
        sys.exit(3)


def _name_from_choices() -> str:
    """e.g. deepseek_tiny-aux_free, plus the job number inside a multirun sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    hydra_cfg = HydraConfig.get()
    choices = hydra_cfg.runtime.choices
    name = f"{choices.get('model')}-{choices.get('balance')}"
    if hydra_cfg.mode == RunMode.MULTIRUN:
        name += f"-job{hydra_cfg.job.num}"
    return name


def run() -> None:
    """`main` for every job (one, or several in a -m sweep), then the process groups are
    destroyed once, while the interpreter is whole: left to interpreter teardown, gloo's native
    threads can abort the process after the run is done (pytorch/pytorch#179291)."""
    try:
        main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run()
