"""moetrain.plots: the load colour scale, the files written from metrics.jsonl and what each
figure shows (labels, colour bars, collapse and resume markers)."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moetrain import plots

REPO = Path(__file__).resolve().parents[2]
MOE_FILES = {"loss.png", "expert_load_layer0.png", "expert_load_layer1.png",
             "max_violation.png", "load_entropy.png"}


def colour_distance(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a)[:3] - np.asarray(b)[:3]))


def write_jsonl(run_dir: Path, records: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def moe_step(step: int, loss: float) -> dict:
    """2 MoE layers of 8 experts; expert 3 of layer 0 at 5x its share, expert 1 of layer 1
    idle from step 12 on."""
    load = np.full((2, 8), 1.0)
    load[0, 3] = 5 * 7 / 3  # 5/8 of the tokens after normalising: 5x the fair share
    if step >= 12:
        load[1, 1] = 0.0
    fraction = load / load.sum(-1, keepdims=True)
    return {"step": step, "loss": loss + 0.05, "ce_loss": loss, "aux_loss": 0.05,
            "grad_norm": 1.0, "lr": 1e-3, "tokens_per_s": 1e4, "tokens_seen": 4096 * step,
            "moe": {"layers": [0, 1], "load_fraction": fraction.tolist(),
                    "max_violation_global": (fraction.max(-1) * 8 - 1).tolist(),
                    "load_entropy": [0.8, 0.9 - 0.01 * step], "dead_experts": [0, 0]}}


@pytest.fixture
def moe_run(tmp_path) -> Path:
    records = [moe_step(s, 5 - 0.1 * s) for s in range(1, 11)]
    records.append({"step": 10, "val_loss": 4.2})
    # Resumed from the step-8 checkpoint: steps 9 and 10 are logged a second time.
    records.append({"event": "resume", "step": 8, "checkpoint": "checkpoints/step8"})
    records += [moe_step(s, 3.0) for s in range(9, 21)]
    records.insert(-8, {"event": "collapse", "step": 12, "layer": 1, "kind": "starved",
                        "message": "expert collapse in layer 1: experts [1] ..."})
    records.append({"event": "collapse", "message": "an older run's event: no step, no layer"})
    return write_jsonl(tmp_path / "run", records)


# ---- the colour scale ---------------------------------------------------------------------

def test_norm_is_log_and_centred_on_the_fair_share():
    norm, cmap = plots.load_norm(np.array([0.5, 1.0, 2.0, 5.0])), plots.load_cmap()
    assert (norm.vmin, norm.vmax) == (1 / 8, 8)  # 5x needs r = 8, the next power of 2
    assert math.isclose(norm(1.0), 0.5)
    assert math.isclose(norm(0.5) + norm(2.0), 1.0)  # 1/2x and 2x mirror each other
    assert math.isclose(norm(2.0), (1 + 3) / 6)  # log2(2) on a -3..3 scale
    assert colour_distance(cmap(norm(5.0)), cmap(norm(2.0))) > 0.15
    assert colour_distance(cmap(norm(2.0)), cmap(norm(1.0))) > 0.15


def test_scale_is_at_least_4_and_grows_to_cover_the_largest_overload():
    assert plots.load_ratio_range(np.array([1.0, 1.5])) == 4
    assert plots.load_ratio_range(np.array([0.0, 4.0])) == 4
    assert plots.load_ratio_range(np.array([20.0])) == 32
    norm, cmap = plots.load_norm(np.array([1.0, 8.0, 20.0])), plots.load_cmap()
    assert norm(20.0) < 1.0  # not clipped
    assert colour_distance(cmap(norm(20.0)), cmap(norm(8.0))) > 0.1


def test_idle_expert_is_black_not_the_colour_of_an_underloaded_one():
    norm, cmap = plots.load_norm(np.array([1.0])), plots.load_cmap()
    idle, starved, mild = cmap(norm(np.array([0.0, 0.01, 0.8])))
    assert tuple(idle) == (0, 0, 0, 1)
    assert colour_distance(idle, starved) > 0.3 and colour_distance(idle, mild) > 0.3


# ---- reading metrics.jsonl ----------------------------------------------------------------

def test_read_metrics_keeps_latest_of_each_step_and_the_placeable_events(moe_run):
    metrics = plots.read_metrics(moe_run)
    assert [r["step"] for r in metrics.records] == list(range(1, 21))
    step10 = metrics.records[9]
    assert step10["ce_loss"] == 3.0 and step10["val_loss"] == 4.2  # re-logged, val kept
    assert metrics.resume_steps == [8]
    assert metrics.collapses == [plots.CollapseMark(step=12, layer=1, kind="starved")]
    assert plots.read_records(moe_run) == metrics.records


def test_missing_metrics_is_a_one_line_error_naming_the_path(tmp_path):
    with pytest.raises(ValueError) as error:
        plots.write_plots(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "metrics.jsonl") in message and "\n" not in message


def test_cut_off_last_line_is_skipped(tmp_path):
    write_jsonl(tmp_path, [moe_step(1, 4.0)])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "loss": 3.')  # the process was killed mid-write
    assert [r["step"] for r in plots.read_records(tmp_path)] == [1]


# ---- the files and figures ----------------------------------------------------------------

def test_write_plots_writes_the_expected_files(moe_run):
    written = plots.write_plots(moe_run)
    assert {p.name for p in written} == MOE_FILES
    assert {p.name for p in (moe_run / "plots").iterdir()} == MOE_FILES
    assert all(p.parent == moe_run / "plots" and p.stat().st_size > 1000 for p in written)


def test_loss_figure_has_units_and_marks_the_resume(moe_run):
    ax = plots.loss_figure(plots.read_metrics(moe_run)).axes[0]
    assert "nats" in ax.get_ylabel() and ax.get_xlabel() == "step"
    assert [list(line.get_xdata()) for line in ax.lines if line.get_label() == "resumed"] == [
        [8, 8]]
    train = next(line for line in ax.lines if line.get_label() == "train")
    assert train.get_ydata()[-1] == 3.0  # ce_loss, not the total loss


def test_a_run_that_logged_one_step_is_drawn(tmp_path):
    metrics = plots.read_metrics(write_jsonl(tmp_path / "one", [moe_step(1, 4.0)]))
    axes = [plots.loss_figure(metrics).axes[0],
            plots.layer_metric_figure(metrics, "max_violation_global", "MaxVio").axes[0]]
    for ax in axes:  # a line through one point has no length: each needs its marker
        assert ax.lines and all(line.get_marker() == "o" for line in ax.lines)
        assert ax.get_xlim() == (0, 2)  # whole steps around it, not fractions of one


def vertical_lines_at(ax, step) -> list:
    return [line for line in ax.lines if list(line.get_xdata()) == [step, step]]


def test_expert_load_heatmap_has_labels_colorbar_and_the_layers_own_collapse(moe_run):
    metrics = plots.read_metrics(moe_run)
    for layer, collapsed in ((0, False), (1, True)):
        ax = plots.expert_load_figure(metrics, layer).axes[0]
        mesh = ax.collections[0]
        assert mesh.colorbar is not None
        assert "load / fair share" in mesh.colorbar.ax.get_ylabel()
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("step", "expert")
        assert mesh.norm.vmax >= 5  # the 5x expert of layer 0 is not clipped in either layer
        assert bool(vertical_lines_at(ax, 12)) == collapsed
        assert any("starved" in t.get_text() for t in ax.texts) == collapsed


def test_layer_metric_marks_collapse_in_the_layers_colour(moe_run):
    ax = plots.layer_metric_figure(plots.read_metrics(moe_run), "max_violation_global",
                                   "MaxVio").axes[0]
    layer1 = next(line for line in ax.lines if line.get_label() == "layer 1")
    (marker,) = vertical_lines_at(ax, 12)
    assert marker.get_color() == layer1.get_color()
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "MaxVio"


def test_wandb_heatmap_is_a_labelled_rgb_image():
    load = np.full((2, 8), 1 / 8)
    fig = plots.load_heatmap_figure(load, layers=[1, 3], step=40)
    pixels = plots.figure_to_rgb(fig)
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    assert pixels.shape[0] >= 4 * 32 and pixels.shape[1] >= 4 * 64
    ax = fig.axes[0]
    assert ax.images[0].colorbar is not None and ax.get_xlabel() == "expert"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["layer 1", "layer 3"]
    assert "40" in ax.get_title()


def test_wandb_heatmap_thins_expert_ticks():
    fig = plots.load_heatmap_figure(np.full((4, 256), 1 / 256), layers=[0, 1, 2, 3])
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert 8 <= len(labels) <= 16 and labels[:2] == ["0", "16"]
    assert fig.get_size_inches()[0] <= 14


def test_dense_run_gets_only_the_loss_plot(tmp_path):
    # An older file: "loss" only, no ce_loss.
    write_jsonl(tmp_path, [{"step": s, "loss": 5.0 - s} for s in (1, 2, 3)])
    assert [p.name for p in plots.write_plots(tmp_path, tmp_path / "out")] == ["loss.png"]


def test_drawing_never_imports_pyplot():
    # pyplot is what selects a global backend (even matplotlib.get_backend() imports it), so a
    # fresh process that draws a figure without importing it left the backend alone.
    code = ("import sys, numpy as np; from moetrain import plots; "
            "plots.figure_to_rgb(plots.load_heatmap_figure(np.full((2, 8), 1 / 8), [0, 1])); "
            "assert 'matplotlib.pyplot' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---- the command line ---------------------------------------------------------------------

def load_cli():
    spec = importlib.util.spec_from_file_location("plot_expert_load",
                                                  REPO / "scripts" / "plot_expert_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_prints_paths_and_reports_empty_or_missing_metrics(tmp_path, moe_run, capsys):
    cli = load_cli()
    assert cli.main([str(moe_run), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out.split()
    assert {Path(p).name for p in printed} == MOE_FILES
    with pytest.raises(SystemExit, match="metrics.jsonl does not exist"):
        cli.main([str(tmp_path / "nowhere")])
    write_jsonl(tmp_path / "empty", [{"event": "resume", "step": 0, "checkpoint": "c"}])
    assert cli.main([str(tmp_path / "empty")]) == 0
    assert "no step record" in capsys.readouterr().err
