"""The real entry point end to end: world 1 and world 2 (torchrun, gloo), a multirun sweep,
and the plot script on the run directories they write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
QUICK = ["experiment=quick", "train.steps=6", "train.log_every=2", "train.val_every=3",
         "data.synthetic_docs=600", "data.synthetic_val_docs=60", "data.seq_len=32",
         "train.micro_batch_size=4", "logger=none"]
MOE_FIELDS = {"layers", "tokens_per_expert", "load_fraction", "max_violation_global",
              "max_violation_micro", "load_entropy", "dead_experts", "dropped_fraction",
              "aux_loss", "z_loss", "router_entropy"}


def env():
    return {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled",
            "HF_DATASETS_OFFLINE": "1"}


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def check_run(run_dir: Path, moe_layers: list[int], bias: bool):
    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6]  # written once (rank 0 only)
    for r in train:
        assert {"loss", "ce_loss", "aux_loss", "grad_norm", "lr", "tokens_per_s"} <= r.keys()
        assert MOE_FIELDS <= r["moe"].keys() and r["moe"]["layers"] == moe_layers
        assert ("bias_mean" in r["moe"]) == bias
        assert abs(sum(r["moe"]["load_fraction"][0]) - 1) < 1e-5
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    assert train[-1]["loss"] < train[0]["loss"] + 0.5
    assert "train_schema" not in (run_dir / "config.yaml").read_text()
    assert "max_seq_len" in (run_dir / "config.yaml").read_text()
    plots = subprocess.run([sys.executable, str(REPO / "scripts/plot_expert_load.py"),
                            str(run_dir)], capture_output=True, text=True, env=env(),
                           timeout=120)
    assert plots.returncode == 0, plots.stderr
    written = {p.name for p in (run_dir / "plots").iterdir()}
    assert {f"expert_load_layer{i}.png" for i in moe_layers} | {
        "max_violation.png", "load_entropy.png", "loss.png"} <= written
    assert all((run_dir / "plots" / name).stat().st_size > 1000 for name in written)


def test_world1_entry_point_and_plots(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "moetrain.train", *QUICK,
                           f"run_dir={run_dir}"], cwd=tmp_path, capture_output=True,
                          text=True, env=env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "active per token" in proc.stdout and "mesh: world 1" in proc.stdout
    check_run(run_dir, [0, 1, 2, 3], bias=False)


def test_world2_torchrun_deepseek_expert_parallel(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [str(REPO / "launch/torchrun.sh"), *QUICK, "model=deepseek_tiny", "balance=aux_free",
         "model.moe.top_k=4", "parallel.ep=2", "train.activation_checkpointing=full",
         "train.val_batches=1", f"run_dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, env={**env(), "NPROC": "2"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "16 per rank" in proc.stdout and "ep 2 x edp 1" in proc.stdout
    check_run(run_dir, [1, 2, 3], bias=True)
    # the recomputation in backward does not count tokens again: 2 ranks x 4 x 32 tokens x k=4
    for record in read_metrics(run_dir):
        if "moe" in record:
            assert [sum(layer) for layer in record["moe"]["tokens_per_expert"]] == [1024] * 3
    # validation loads are summed over both ranks' batches too (one batch each here)
    val = [r["val_moe"] for r in read_metrics(run_dir) if "val_moe" in r]
    assert len(val) == 2
    for record in val:
        assert record["layers"] == [1, 2, 3]
        assert [sum(layer) for layer in record["tokens_per_expert"]] == [1024] * 3


def test_multirun_sweep_writes_one_run_dir_per_job(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moetrain.train", "-m", *QUICK,
                           "train.steps=2", "train.val_every=0",
                           "model=mixtral_tiny,dense_tiny"], cwd=tmp_path,
                          capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.name.rsplit("-", 2)[0] for p in (tmp_path / "runs").iterdir()
                  if p.name != "multirun")
    assert runs == ["dense_tiny-switch_aux-job1", "mixtral_tiny-switch_aux-job0"]
    # Hydra's record of the sweep, kept beside the runs, not in the working directory
    assert len(list((tmp_path / "runs" / "multirun").glob("*/multirun.yaml"))) == 1
    assert not (tmp_path / "multirun.yaml").exists()
