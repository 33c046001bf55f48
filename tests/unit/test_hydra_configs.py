"""Hydra composition over the typed schema: every shipped config, the overrides users reach
for, and invalid configs (each with its one-line message)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import moetrain.train  # noqa: F401  (registers the schema)
from moetrain.config import RunConfig
from moetrain.train import dry_run

REPO = Path(__file__).resolve().parents[2]


def load(*overrides) -> RunConfig:
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return OmegaConf.to_object(compose("train", overrides=list(overrides)))


def test_default_is_mixtral_tiny_with_switch_loss():
    cfg = load()
    assert isinstance(cfg, RunConfig)
    assert cfg.model.moe.router == "softmax_topk" and cfg.model.moe.num_experts == 8
    assert cfg.model.balance.aux_loss == "switch" and cfg.data.source == "synthetic"
    cfg.validate(world_size=2)


def test_architecture_switch_and_overrides():
    cfg = load("model=deepseek_tiny", "balance=aux_free", "model.moe.top_k=4", "parallel.ep=2")
    assert cfg.model.moe.router == "sigmoid" and cfg.model.moe.top_k == 4
    assert cfg.model.balance.aux_free and cfg.parallel.ep == 2
    assert cfg.model.first_k_dense == 1 and cfg.model.moe.n_shared_experts == 2
    cfg.validate(world_size=2)


@pytest.mark.parametrize("model", ["mixtral_tiny", "deepseek_tiny", "dense_tiny",
                                   "mixtral_8x7b", "deepseek_v3"])
@pytest.mark.parametrize("balance", ["switch_aux", "seq_aux", "none"])
def test_every_model_and_balance_composes(model, balance):
    load(f"model={model}", f"balance={balance}").validate(world_size=1)


@pytest.mark.parametrize("model", ["mixtral_tiny", "deepseek_tiny", "dense_tiny"])
def test_shipped_model_is_what_hydra_composes_with_the_shipped_balance(model):
    from moetrain.presets import SHIPPED_BALANCE, shipped_model
    assert shipped_model(model, with_balance=True) == load(
        f"model={model}", f"balance={SHIPPED_BALANCE[model]}").model


def test_dense_tiny_matches_mixtral_tiny_active_parameters():
    from moetrain.model import Transformer, num_params
    import torch
    with torch.device("meta"):
        moe = num_params(Transformer(load("model=mixtral_tiny").model))
        dense = num_params(Transformer(load("model=dense_tiny").model))
        deepseek = num_params(Transformer(load("model=deepseek_tiny").model))
    # equal active FFN width (512); the routers are the MoE models' only extra active weights
    assert moe["active"] - dense["active"] == 4 * 8 * 128
    assert deepseek["active"] - dense["active"] == 3 * 32 * 128


def test_full_size_shapes_build_on_meta_with_known_sizes(capsys):
    mixtral = dry_run(load("model=mixtral_8x7b"))
    assert abs(mixtral["total"] / 46.7e9 - 1) < 0.01  # Mixtral 8x7B: 46.7B total
    assert abs(mixtral["active"] / 12.9e9 - 1) < 0.01  # 12.9B active
    deepseek = dry_run(load("model=deepseek_v3"))
    assert deepseek["total"] > 600e9 and 30e9 < deepseek["active"] < 60e9
    assert "parameters:" in capsys.readouterr().out


INVALID = [
    (["model.moe.top_k=9"], "model.moe.top_k=9 must be between 1 and model.moe.num_experts=8"),
    (["model=deepseek_tiny", "model.moe.n_groups=5"], "not divisible into model.moe.n_groups=5"),
    (["model=deepseek_tiny", "model.moe.topk_groups=8"], "moe.topk_groups=8"),
    (["model=deepseek_tiny", "model.moe.top_k=20"], "exceeds the 16 experts"),
    (["model.moe.capacity_factor=0"], "moe.capacity_factor=0"),
    (["model.moe.router=hash"], "moe.router='hash'"),
    (["balance=aux_free"], "model.balance.aux_free=true needs model.moe.router='sigmoid'"),
    (["model.balance.aux_loss=gshard"], "balance.aux_loss='gshard'"),
    (["model.n_heads=3"], "model.dim=128 is not divisible by model.n_heads=3"),
    (["parallel.ep=3"], "parallel.ep=3 does not divide the world size 2"),
    (["parallel.ep=2", "model.moe.num_experts=7", "model.moe.top_k=2"],
     "moe.num_experts=7 is not divisible by parallel.ep=2"),
    (["data.seq_len=512"], "data.seq_len=512 exceeds model.max_seq_len=256"),
    (["data.source=text"], "data.source='text' needs data.path"),
    (["data=local_text", "data.path=x.txt", "data.sample_by=sentence"],
     "data.sample_by='sentence' is not one of line, paragraph, document"),
    (["optim.lr=0"], "optim.lr=0.0 must be > 0"),
    (["train.on_nonfinite=ignore"], "train.on_nonfinite='ignore'"),
    (["monitor.on_collapse=panic"], "monitor.on_collapse='panic'"),
    (["logger.wandb.mode=cloud"], "logger.wandb.mode='cloud'"),
    (["train.micro_batch_size=0"], "train.micro_batch_size=0 must be >= 1"),
]


@pytest.mark.parametrize("overrides,message", INVALID, ids=[m for _, m in INVALID])
def test_invalid_config_is_one_clear_line(overrides, message):
    with pytest.raises(ValueError) as info:
        load(*overrides).validate(world_size=2)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("override", ["train.steps=many", "model.moe.num_experts=1.5",
                                      "model.dim=[1]", "no_such_field=1"])
def test_wrong_type_or_unknown_override_is_rejected_by_hydra(override):
    with pytest.raises(ConfigCompositionException):
        load(override)


def run_cli(*args, **env):
    return subprocess.run([sys.executable, "-m", "moetrain.train", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_cli_invalid_config_exits_with_one_line_and_writes_nothing(tmp_path):
    proc = run_cli("model.moe.top_k=9", f"run_dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("moetrain: error: model.moe.top_k=9 must be between 1 and "
                                   "model.moe.num_experts=8")
    assert not (tmp_path / "run").exists()


def test_a_misspelt_experiment_is_an_error_not_the_defaults(tmp_path):
    from moetrain.train.cli import config_from_overrides
    message = "experiment='quik' is not one of balancing, moe_vs_dense, quick"
    with pytest.raises(ValueError, match=message):
        config_from_overrides(["experiment=quik"])
    assert config_from_overrides(["experiment=quick"]).train.steps == 40
    for args in (["experiment=quik"], ["-m", "experiment=quik"]):  # a sweep's jobs too
        proc = run_cli(*args, "dry_run=true", f"run_dir={tmp_path / 'run'}")
        assert proc.returncode == 2 and proc.stderr.strip().endswith(message), proc.stderr


def test_cli_wrong_type_override_fails_with_hydra_message():
    proc = run_cli("train.steps=many")
    assert proc.returncode != 0
    assert "train.steps" in proc.stderr and "many" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_dry_run_prints_sizes():
    proc = run_cli("model=mixtral_8x7b", "dry_run=true")
    assert proc.returncode == 0, proc.stderr
    assert "parameters: 46,70" in proc.stdout and "top-2" in proc.stdout


def test_console_script_runs_the_same_entry_point(tmp_path):
    script = Path(sys.executable).parent / "moetrain-train"
    if not script.exists():
        pytest.skip("the package is not installed (scripts/setup.sh installs it)")
    proc = subprocess.run([str(script), "model=mixtral_8x7b", "dry_run=true"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "parameters: 46,70" in proc.stdout and "top-2" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["-m", "train.stepz=5"], "unknown config key 'train.stepz'"),
    (["-m", "model.moe.top_k=2,9"], "model.moe.top_k=9 must be between 1 and"),  # job 2
])
def test_every_job_of_a_sweep_is_checked_before_any_runs(tmp_path, args, message):
    proc = run_cli(*args, f"run_dir={tmp_path / 'run'}", "train.steps=1")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("moetrain: error: ") and proc.stderr.count("\n") == 1
    assert message in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, fields", [
    ("train.stepz=5", "activation_checkpointing, compile, exit_at_step, grad_accum"),
    ("model.moe.topk=3", "capacity_factor, expert_hidden, freeze_router"),
    ("unknown.key=1", "checkpoint, data, dry_run, finetune"),
])
def test_an_unknown_key_without_plus_lists_the_valid_ones_too(override, fields):
    from moetrain.train.cli import config_from_overrides
    with pytest.raises(ValueError) as err:
        config_from_overrides([override])
    key = override.split("=")[0] if override != "unknown.key=1" else "unknown"
    assert str(err.value).startswith(f"unknown config key '{key}'; valid keys here: {fields}")


def test_a_value_of_the_wrong_type_says_why_in_one_line():
    from moetrain.train.cli import config_from_overrides
    with pytest.raises(ValueError) as err:
        config_from_overrides(["train.steps=abc"])
    assert str(err.value) == ("invalid overrides: Error merging override train.steps=abc: Value "
                              "'abc' of type 'str' could not be converted to Integer")
