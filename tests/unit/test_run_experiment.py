"""scripts/run_experiment.py: both experiments end to end on a two-step budget (every variant,
two seeds, real training processes), and the summary and mean ± std on crafted metrics."""

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]
# Two steps on a small generated corpus, validated at the end: what matters is the plumbing.
TWO_STEPS = ["train.steps=2", "train.val_every=2", "train.log_every=1", "train.val_batches=2",
             "data=synthetic", "data.synthetic_docs=300", "data.synthetic_val_docs=50",
             "logger.plots=false"]


def load_runner():
    spec = importlib.util.spec_from_file_location("run_experiment",
                                                  REPO / "scripts" / "run_experiment.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


runner = load_runner()


# ---- end to end ------------------------------------------------------------------------------

@pytest.mark.parametrize("experiment", ["balancing", "moe_vs_dense"])
def test_experiment_end_to_end_on_two_steps(tmp_path, experiment):
    # the overrides after --seeds are Hydra's, not seeds
    document = runner.main([experiment, "--seeds", "0", "1", "--out", str(tmp_path),
                            *TWO_STEPS])
    for name in ("results.md", "results.json", "comparison.png", "heatmaps.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    spec = runner.EXPERIMENTS[experiment]
    assert list(saved["variants"]) == list(spec.variants) and saved["seeds"] == [0, 1]
    assert saved["setup"]["steps"] == 2 and saved["setup"]["data"] == "synthetic"
    table = (tmp_path / "results.md").read_text()
    base_losses = saved["variants"][spec.baseline]["per_seed"]["val_loss"]
    for variant, result in saved["variants"].items():
        losses = result["per_seed"]["val_loss"]
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
        assert losses[0] != losses[1]  # the seed changes initialisation and data
        stats = result["summary"]["val_loss"]
        assert stats["mean"] == pytest.approx(statistics.fmean(losses))
        assert stats["std"] == pytest.approx(statistics.stdev(losses))
        assert stats["n"] == 2
        if variant != spec.baseline:
            assert result["per_seed"]["val_loss_gap"] == pytest.approx(
                [loss - base for loss, base in zip(losses, base_losses, strict=True)])
        assert f"| {variant} |" in table
        for seed in (0, 1):
            run_dir = tmp_path / variant / f"seed{seed}"
            assert (run_dir / "log.txt").read_text().startswith("$ python -m moetrain.train")
            cfg = OmegaConf.load(run_dir / "config.yaml")
            assert cfg.train.seed == seed and cfg.data.seed == seed
    assert f"{statistics.fmean(base_losses):.3f} ± " in table
    assert document["wall_s"] > 0
    # the report alone, again from the same runs: the same numbers
    again = runner.main([experiment, "--seeds", "0", "1", "--out", str(tmp_path),
                         "--report-only", *TWO_STEPS])
    assert again["variants"] == document["variants"] and again["wall_s"] is None
    runs = {v: OmegaConf.load(tmp_path / v / "seed0" / "config.yaml").model
            for v in spec.variants}
    if experiment == "balancing":
        assert {m.moe.router for m in runs.values()} == {"sigmoid"}
        assert runs["aux_free_1e-3"].balance.aux_free
        paper = runs["aux_free_1e-3"].balance
        assert paper.bias_update_rate == 0.001 and paper.bias_update == "sign"
        assert paper.aux_loss == "none" and not paper.bias_center
        assert not runs["none"].balance.aux_free and runs["none"].balance.aux_loss == "none"
        assert runs["switch_aux"].balance.aux_loss == "switch"
    else:
        assert runs["dense"].moe is None and runs["dense_4x"].ffn_hidden == 4 * 512
        assert runs["mixtral"].moe.num_experts == 8 and runs["deepseek"].moe.num_experts == 32


def test_a_failed_run_stops_the_experiment_and_shows_its_log(tmp_path, capsys):
    with pytest.raises(SystemExit, match="none seed 0 failed"):
        # one job at a time: with two, whichever failing run is polled first is the one named
        runner.main(["balancing", "--seeds", "0", "--jobs", "1", "--out", str(tmp_path),
                     "train.steps=0"])
    assert "train.steps=0 must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_a_report_of_no_runs_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        runner.main(["balancing", "--out", str(tmp_path / "nowhere"), "--report-only"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("nowhere holds no runs of balancing (no such directory); pass the --out "
                        "of the runs")


# ---- summaries and aggregation on crafted metrics --------------------------------------------

def moe_record(step, max_violation, dead, loss=1.0):
    return {"step": step, "loss": loss + 0.5, "ce_loss": loss, "tokens_per_s": 1000.0 * step,
            "tokens_seen": 100 * step,
            "moe": {"layers": [1, 2], "max_violation_global": max_violation,
                    "dead_experts": dead}}


def test_summary_of_one_run():
    records = [moe_record(10, [2.0, 3.0], [1, 2], loss=3.0),
               moe_record(20, [0.2, 0.4], [0, 1], loss=2.0),
               moe_record(30, [0.2, 0.6], [0, 1], loss=1.8),
               moe_record(40, [0.1, 0.3], [0, 0], loss=1.6),
               {**moe_record(50, [0.1, 0.2], [0, 0], loss=1.5), "val_loss": 1.7}]
    summary = runner.summarise_records(records)
    assert summary["steps"] == 50 and summary["tokens"] == 5000
    assert summary["val_loss"] == 1.7
    assert summary["train_loss"] == pytest.approx((3.0 + 2.0 + 1.8 + 1.6 + 1.5) / 5)  # ce, no aux
    assert summary["tokens_per_s"] == pytest.approx(35000)  # the warm-up window left out
    assert summary["max_violation_mean"] == pytest.approx((2.5 + 0.3 + 0.4 + 0.2 + 0.15) / 5)
    assert summary["max_violation_end"] == 0.2  # the worst layer
    assert summary["steps_to_balance"] == 40  # step 30's worst layer is still at 0.6
    assert summary["dead_experts_step30"] == 1 and summary["dead_experts_end"] == 0

    dense = runner.summarise_records([{k: v for k, v in r.items() if k != "moe"}
                                      for r in records])
    assert "max_violation_mean" not in dense and dense["val_loss"] == 1.7


def test_steps_to_balance_counts_only_staying_below():
    assert runner.steps_to_balance([5, 10, 15], [0.4, 0.3, 0.2]) == 5
    assert runner.steps_to_balance([5, 10, 15], [0.9, 0.3, 0.7]) is None
    assert runner.steps_to_balance([5, 10, 15], [0.9, 0.5, 0.49]) == 15  # 0.5 is not below


def test_mean_and_std_over_seeds_with_gaps_paired_by_seed():
    per_seed = {"dense": [{"val_loss": 2.0}, {"val_loss": 2.2}, {"val_loss": 1.9}],
                "moe": [{"val_loss": 1.9, "steps_to_balance": 40},
                        {"val_loss": 2.15, "steps_to_balance": None},
                        {"val_loss": 1.85, "steps_to_balance": 60}]}
    results = runner.aggregate_variants(per_seed, baseline="dense")
    moe = results["moe"]
    gaps = [-0.1, -0.05, -0.05]
    assert moe["per_seed"]["val_loss_gap"] == pytest.approx(gaps)
    assert moe["summary"]["val_loss_gap"]["mean"] == pytest.approx(statistics.fmean(gaps))
    # paired: the gap's spread (0.03) is far below either loss's (0.15)
    assert moe["summary"]["val_loss_gap"]["std"] == pytest.approx(statistics.stdev(gaps))
    assert moe["summary"]["val_loss"]["std"] == pytest.approx(statistics.stdev([1.9, 2.15, 1.85]))
    assert moe["summary"]["steps_to_balance"] == {"mean": 50, "std": pytest.approx(
        statistics.stdev([40, 60])), "n": 2}  # the seed that never balanced is counted out
    assert "val_loss_gap" not in results["dense"]["summary"]

    columns = {c.key: c for c in runner.columns("dense")}
    cell = runner.format_cell
    assert cell(columns["val_loss_gap"], moe["summary"]["val_loss_gap"], 3) == "−0.067 ± 0.029"
    assert cell(columns["steps_to_balance"], moe["summary"]["steps_to_balance"], 3) == \
        "50 ± 14 (2 of 3 seeds)"
    assert cell(columns["steps_to_balance"], runner.aggregate([None, None]), 2) == "never"
    assert runner.aggregate([1.5]) == {"mean": 1.5, "std": None, "n": 1}
    assert cell(columns["val_loss"], runner.aggregate([1.5]), 1) == "1.500"
    assert cell(columns["val_loss"], None, 1) == "-"


def test_hydra_overrides_anywhere_on_the_line():
    options, overrides = runner.split_overrides(
        ["balancing", "--seeds", "0", "1", "train.steps=2", "--out=/tmp/x=y", "data=synthetic"])
    assert options == ["balancing", "--seeds", "0", "1", "--out=/tmp/x=y"]
    assert overrides == ["train.steps=2", "data=synthetic"]
