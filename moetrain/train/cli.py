"""Entry point: `python -m moetrain.train [hydra overrides]` (or `moetrain-train`).

Thin on purpose: Hydra composes configs/ over the typed schema in moetrain.config; the
Trainer does the rest. A bad config, an unknown key (even one added with `+`) or bad data ends
the run with one line and exit code 2 before any collective; under torchrun the line goes to
the launcher (moetrain.launcher prints it once). A stop on SIGTERM/SIGINT/SIGUSR1 prints one
line on rank 0 and exits 128 + the signal number.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
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
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


def check_experiment(name: str | None) -> None:
    """train.yaml's `optional experiment` lets Hydra skip a name with no file without a word:
    a misspelt experiment would run the defaults."""
    if name in (None, "null"):
        return
    known = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
    if name not in known:
        raise ValueError(f"experiment={name!r} is not one of {', '.join(known)}")


def unknown_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Dotted keys that no field of the typed schema declares. Hydra adds `+key=value` to
    a structured config and OmegaConf.to_object then drops it silently."""
    kind = OmegaConf.get_type(node)
    fields = ({f.name for f in dataclasses.fields(kind)} if dataclasses.is_dataclass(kind)
              else None)
    found = []
    for key in node.keys():
        if fields is not None and key not in fields:
            found.append(f"{prefix}{key}")
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none():
            found.extend(unknown_keys(child, f"{prefix}{key}."))
    return found


def schema_keys(key: str) -> str:
    """'valid keys here: ...' for an unknown dotted key, from the typed schema."""
    import typing
    kind = RunConfig
    for part in key.split(".")[:-1]:
        hints = typing.get_type_hints(kind)
        inner = [t for t in (hints.get(part), *typing.get_args(hints.get(part)))
                 if dataclasses.is_dataclass(t)]
        if not inner:
            return "see configs/ and moetrain/config.py for the valid keys"
        kind = inner[0]
    return f"valid keys here: {', '.join(sorted(f.name for f in dataclasses.fields(kind)))}"


def to_run_config(dict_cfg: DictConfig) -> RunConfig:
    unknown = unknown_keys(dict_cfg)
    if unknown:
        parent = unknown[0].rpartition(".")[0]
        node = OmegaConf.select(dict_cfg, parent) if parent else dict_cfg
        fields = sorted(f.name for f in dataclasses.fields(OmegaConf.get_type(node)))
        raise ValueError(f"unknown config key {unknown[0]!r}; valid keys here: "
                         f"{', '.join(fields)}")
    return OmegaConf.to_object(dict_cfg)


def config_from_overrides(overrides: list[str]) -> RunConfig:
    """The RunConfig of `python -m moetrain.train OVERRIDES`, composed in this process (no
    Hydra run): what a launcher checks before it starts any rank."""
    from hydra import compose, initialize_config_dir
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key == "experiment":
            check_experiment(value)
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            dict_cfg = compose(config_name="train", overrides=list(overrides))
    except Exception as error:
        cause = error.__cause__
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
            raise ValueError(f"unknown config key {cause.full_key!r}; "
                             f"{schema_keys(cause.full_key)}") from None
        reason = " ".join(str(error).split())  # Hydra's messages span lines
        if cause is not None and str(cause).strip():  # e.g. why a value does not convert
            reason += f": {str(cause).strip().splitlines()[0]}"
        raise ValueError(f"invalid overrides: {reason}") from None
    return to_run_config(dict_cfg)


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The override list of every job of a -m sweep (`model=a,b train.steps=3` gives two);
    one list when nothing sweeps."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as error:
        raise ValueError(f"invalid overrides: {' '.join(str(error).split())}") from None
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def preflight(overrides: list[str], world: int | None) -> RunConfig:
    """Every check of a run that needs neither data nor ranks; raises ValueError."""
    from moetrain.train.setup import apply_init_from_hf, check_run_dir
    cfg = config_from_overrides(overrides)
    apply_init_from_hf(cfg)
    if world is not None:
        cfg.validate(world)
    if cfg.run_dir:
        check_run_dir(cfg.run_dir)
    return cfg


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(dict_cfg: DictConfig) -> None:
    from moetrain.train.loop import Trainer, TrainingStopped
    from moetrain.train.preemption import STOP, Preempted
    from moetrain.train.setup import apply_init_from_hf, dry_run, world_size_from_env
    STOP.signum = None  # a sweep's next job: the last one's signal is not this one's
    try:
        from hydra.core.hydra_config import HydraConfig
        check_experiment(HydraConfig.get().runtime.choices.get("experiment"))
        cfg = to_run_config(dict_cfg)
        if cfg.name == RunConfig.name:
            cfg.name = _name_from_choices()
        if cfg.dry_run:  # the layout of WORLD_SIZE ranks (1 if unset), without starting them
            apply_init_from_hf(cfg)
            cfg.validate(world_size_from_env())
            dry_run(cfg)
            return
        Trainer(cfg).fit()
    except ValueError as error:
        fail(f"moetrain: error: {error}", 2)
    except TrainingStopped as stop:
        fail(f"moetrain: stopped: {stop}", 3)
    except Preempted as stop:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"moetrain: {stop}", file=sys.stderr, flush=True)
        sys.exit(stop.code)
    except Exception:
        exit_if_stopping()
        raise


def exit_if_stopping() -> None:
    """For an error after a stop signal: a signal reaches the ranks at slightly different
    moments, and one still starting up leaves at once (nothing to save), so another, already
    in a collective with it, fails there. That failure is the stop, not a crash: exit as a
    stop without a checkpoint, quietly."""
    from moetrain.train.preemption import STOP
    if not STOP.requested:
        return
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"moetrain: stopped by {STOP.name} while another rank was leaving; no "
              "checkpoint written", file=sys.stderr, flush=True)
    sys.exit(128 + STOP.signum)


def fail(line: str, code: int) -> None:
    """Exit with one line. Under torchrun every rank records it in its error file, which
    moetrain.launcher prints once; otherwise (one process, or plain torchrun) rank 0 prints."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with open(error_file, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": {
                "timestamp": str(int(time.time())), "moetrain": True, "exitcode": code}}}, f)
    if os.environ.get("MOETRAIN_LAUNCHER") != "1" and int(os.environ.get("RANK", "0")) == 0:
        print(line, file=sys.stderr, flush=True)
    sys.exit(code)


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
    from moetrain.train.preemption import STOP
    STOP.install()  # a signal during start-up exits at once, without a traceback
    overrides = sys.argv[1:]
    flags = {arg for arg in overrides if arg.startswith("-")}
    if flags <= {"-m", "--multirun"}:  # a run or a sweep; --help, --cfg ... are Hydra's
        try:  # Hydra's own override errors are several lines and exit 1
            jobs = sweep_jobs([arg for arg in overrides if arg not in flags])
            if len(jobs) == 1:  # main checks the rest, before any work
                config_from_overrides(jobs[0])
            else:  # every job, before the first one starts
                from moetrain.train.setup import world_size_from_env
                for job in jobs:
                    preflight(job, world_size_from_env())
        except ValueError as error:
            fail(f"moetrain: error: {error}", 2)
    try:
        main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
