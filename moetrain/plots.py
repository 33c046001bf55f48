"""Plots of a run's metrics.jsonl: loss, expert load heatmaps, MaxVio and load entropy.

Built on matplotlib's object-oriented API (`Figure` + the Agg canvas), never pyplot: importing
this module in a training process selects no backend and keeps no figure alive.

Expert load is drawn as load / fair share (fair share = 1/E) on a diverging log colour scale
centred on 1, so 1/2x and 2x are equally far from white, an expert at 5x its share is a
different colour from one at 2x, and an expert that received no tokens is black rather than the
colour of a mildly underloaded one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colorbar import Colorbar
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
from matplotlib.transforms import blended_transform_factory

MIN_RATIO_RANGE = 4.0  # the load scale spans at least 1/4x .. 4x the fair share
MAX_WIDTH_IN, MAX_HEIGHT_IN = 14.0, 9.0
DPI = 100
DEAD_COLOR = "black"
MAX_LEGEND_LAYERS = 10  # one tab10 colour and legend entry each; more get viridis + colour bar
LOSS_UNIT = "cross-entropy (nats/token)"
CollapseKind = Literal["starved", "entropy"]


@dataclass(frozen=True)
class CollapseMark:
    """One detected collapse, as the trainer logs it: where to draw it and what it was."""
    step: int
    layer: int
    kind: CollapseKind


@dataclass
class RunMetrics:
    records: list[dict]  # one per step, sorted; a re-logged step keeps its latest values
    resume_steps: list[int]
    collapses: list[CollapseMark]

    @cached_property
    def moe_records(self) -> list[dict]:
        return [r for r in self.records if "moe" in r]

    @cached_property
    def load_ratios(self) -> np.ndarray:
        """(steps, L, E) load / fair share of moe_records; built once, read by every layer."""
        load = np.array([r["moe"]["load_fraction"] for r in self.moe_records], dtype=float)
        return load * load.shape[-1]


def read_metrics(run_dir: Path) -> RunMetrics:
    """Step records and events of RUN_DIR/metrics.jsonl. Collapse events from older runs that
    carry only a message (no step or layer) cannot be placed and are left out."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} does not exist; pass a moetrain run directory")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    parsed = []
    for number, line in enumerate(lines, 1):
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):  # a process killed mid-write leaves a cut-off last line
                break
            raise ValueError(f"{path}:{number} is not JSON ({error})") from None
    # A resumed run logs again the steps after its checkpoint: keep the latest of each step.
    latest: dict[int, dict] = {}
    resume_steps, collapses = [], []
    for record in parsed:
        event = record.get("event")
        if event is None and "step" in record:
            latest.setdefault(record["step"], {}).update(record)
        elif event == "resume" and "step" in record:
            resume_steps.append(record["step"])
        elif event == "collapse" and {"step", "layer"} <= record.keys():
            collapses.append(CollapseMark(record["step"], record["layer"],
                                          record.get("kind", "starved")))
    return RunMetrics([latest[s] for s in sorted(latest)], resume_steps, collapses)


def read_records(run_dir: Path) -> list[dict]:
    """The step records alone (what scripts/run_experiment.py summarises)."""
    return read_metrics(run_dir).records


# ---- the load colour scale ----------------------------------------------------------------

def load_ratio_range(ratios: np.ndarray) -> float:
    """r for a scale of 1/r .. r: a power of 2, at least 4, covering the largest overload so
    none is clipped. Underloads do not widen it: one nearly idle expert (1/1000x) would
    otherwise wash out every other colour; below 1/r they take the scale's darkest blue."""
    values = np.asarray(ratios, dtype=float)
    values = values[np.isfinite(values)]
    spread = max(values.max(initial=0.0), MIN_RATIO_RANGE)
    # The tolerance keeps a ratio of exactly 4 (say 0.5 * 8 in float) on a 1/4..4 scale.
    return float(2 ** math.ceil(math.log2(spread) - 1e-9))


def load_norm(ratios: np.ndarray) -> LogNorm:
    """Log scale of load / fair share, symmetric around 1 (which maps to 0.5, the centre of the
    colormap). Zero loads are masked by the log, and drawn in the colormap's "bad" colour."""
    r = load_ratio_range(ratios)
    return LogNorm(vmin=1 / r, vmax=r)


def load_cmap() -> Colormap:
    """Diverging: blue under the fair share, white at it, red over it; black for no tokens."""
    return colormaps["RdBu_r"].with_extremes(bad=DEAD_COLOR)


def _add_load_colorbar(fig: Figure, ax: Axes, mappable: ScalarMappable,
                       ratios: np.ndarray) -> Colorbar:
    """The bar's extension and "black" note only where `ratios` (what is drawn) need them."""
    norm = mappable.norm
    starved = bool(np.any((ratios > 0) & (ratios < norm.vmin)))
    colorbar = fig.colorbar(mappable, ax=ax, extend="min" if starved else "neither",
                            fraction=0.05, pad=0.02)
    label = "load / fair share (log scale)"
    if np.any(ratios == 0):
        label += "\nblack: no tokens"
    colorbar.set_label(label)
    exponents = range(-round(math.log2(norm.vmax)), round(math.log2(norm.vmax)) + 1)
    stride = 1 if len(exponents) <= 9 else 2  # keeps 1 (exponent 0) among the ticks
    ticks = [2.0 ** e for e in exponents if e % stride == 0]
    colorbar.set_ticks(ticks, labels=[_ratio_label(t) for t in ticks])
    colorbar.ax.minorticks_off()
    return colorbar


def _ratio_label(ratio: float) -> str:
    return f"{ratio:g}x" if ratio >= 1 else f"1/{1 / ratio:g}x"


# ---- figures ------------------------------------------------------------------------------

def load_heatmap_figure(load_fraction: Sequence[Sequence[float]], layers: Sequence[int],
                        step: int | None = None) -> Figure:
    """One step's load: MoE layers (rows) x experts (columns), for the wandb dashboard."""
    load = np.asarray(load_fraction, dtype=float)  # (L, E)
    num_layers, num_experts = load.shape
    fig, ax = _experts_heatmap(load * num_experts, row_height=0.35, margin=2)
    layer_ticks = _index_ticks(num_layers, 16)
    ax.set_yticks(layer_ticks, labels=[f"layer {layers[i]}" for i in layer_ticks])
    ax.set_title("expert load" + (f" at step {step}" if step is not None else "")
                 + f" ({num_experts} experts, fair share 1/{num_experts})")
    return fig


def specialisation_figure(load: Sequence[Sequence[float]], sources: Sequence[str], layer: int,
                          nmi: float, title: str = "") -> Figure:
    """Data sources (rows) x experts (columns): each source's share of its assignments per
    expert against the fair share 1/E (moetrain.specialisation)."""
    load = np.asarray(load, dtype=float)  # (S, E)
    fig, ax = _experts_heatmap(load * load.shape[1], row_height=0.4, margin=1.8)
    ax.set_yticks(range(len(sources)), labels=list(sources))
    ax.set_title(f"{title + chr(10) if title else ''}layer {layer}: share of each source's "
                 f"tokens per expert (NMI {nmi:.2f})", fontsize="medium")
    return fig


def _experts_heatmap(ratios: np.ndarray, row_height: float, margin: float
                     ) -> tuple[Figure, Axes]:
    """Rows x experts of load / fair share on the load colour scale, with its colour bar and
    the expert axis; the caller labels the rows and the title."""
    num_rows, num_experts = ratios.shape
    fig = _new_figure(min(MAX_WIDTH_IN, 5 + 0.12 * num_experts),
                      min(MAX_HEIGHT_IN, margin + row_height * num_rows))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_less_equal(ratios, 0), cmap=load_cmap(),
                      norm=load_norm(ratios), aspect="auto", interpolation="nearest")
    _add_load_colorbar(fig, ax, image, ratios)
    expert_ticks = _index_ticks(num_experts, 16)
    ax.set_xticks(expert_ticks, labels=[str(e) for e in expert_ticks])
    ax.set_xlabel("expert")
    return fig, ax


def figure_to_rgb(fig: Figure) -> np.ndarray:
    """(H, W, 3) uint8 pixels of `fig`, drawn by the Agg canvas (what wandb.Image takes)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def loss_figure(metrics: RunMetrics) -> Figure:
    """Training cross-entropy (total loss for files that predate ce_loss) and validation loss,
    with a thin line at each resume."""
    fig = _new_figure(8, 4.5)
    ax = fig.add_subplot()
    key = "ce_loss" if any("ce_loss" in r for r in metrics.records) else "loss"
    train = [r for r in metrics.records if key in r]
    val = [r for r in metrics.records if "val_loss" in r]
    if train:
        label = "train" if key == "ce_loss" else "train (total loss, incl. auxiliary)"
        ax.plot([r["step"] for r in train], [r[key] for r in train], label=label, lw=1.2,
                **_lone_point(len(train)))
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", ms=3,
                label="validation")
    for i, step in enumerate(metrics.resume_steps):
        ax.axvline(step, color="grey", lw=0.8, ls=":", label="resumed" if i == 0 else None)
    ax.set(xlabel="step", ylabel=LOSS_UNIT, title="loss")
    _step_axis(ax, [r["step"] for r in train + val])
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def expert_load_figure(metrics: RunMetrics, layer: int) -> Figure:
    """Steps (x) x experts (y) of one MoE layer, with the layer's collapses marked."""
    moe = metrics.moe_records
    index = moe[0]["moe"]["layers"].index(layer)
    steps = np.array([r["step"] for r in moe])
    all_ratios = metrics.load_ratios  # (S, L, E)
    num_experts = all_ratios.shape[-1]
    ratios = all_ratios[:, index, :].T  # (E, S)
    fig = _new_figure(min(MAX_WIDTH_IN, 7 + 0.03 * len(steps)),
                      min(MAX_HEIGHT_IN, 3 + 0.08 * num_experts))
    ax = fig.add_subplot()
    # One norm for every layer, so the same colour means the same load in each layer's PNG.
    # pcolormesh rather than imshow: cells follow the actual steps, even where a resume or a
    # changed log interval left the steps unevenly spaced.
    mesh = ax.pcolormesh(_cell_edges(steps), np.arange(num_experts + 1) - 0.5,
                         np.ma.masked_less_equal(ratios, 0), cmap=load_cmap(),
                         norm=load_norm(all_ratios), rasterized=True)
    _add_load_colorbar(fig, ax, mesh, ratios)
    expert_ticks = _index_ticks(num_experts, 16)
    ax.set_yticks(expert_ticks, labels=[str(e) for e in expert_ticks])
    ax.set(xlabel="step", ylabel="expert",
           title=f"layer {layer}: expert load / fair share (1/{num_experts})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    label_at = blended_transform_factory(ax.transData, ax.transAxes)
    for mark in metrics.collapses:
        if mark.layer == layer:
            ax.axvline(mark.step, color="black", ls="--", lw=1.2)
            ax.text(mark.step, 0.98, f" collapse: {mark.kind} ", transform=label_at,
                    rotation=90, ha="right", va="top", fontsize=8,
                    bbox=dict(facecolor="white", alpha=0.8, lw=0, pad=1))
    return fig


def layer_metric_figure(metrics: RunMetrics, key: str, label: str) -> Figure:
    """One line per MoE layer of a per-layer metric (e.g. max_violation_global) over steps,
    each layer's collapses marked by a dashed line in its colour."""
    moe = [r for r in metrics.moe_records if key in r["moe"]]
    layers = moe[0]["moe"]["layers"]
    steps = [r["step"] for r in moe]
    values = np.array([r["moe"][key] for r in moe], dtype=float)  # (S, L)
    colors = _layer_colors(layers)
    fig = _new_figure(10, 4.5)
    ax = fig.add_subplot()
    for i, layer in enumerate(layers):
        ax.plot(steps, values[:, i], color=colors[i], lw=1.2 if len(layers) <= 4 else 0.8,
                label=f"layer {layer}", **_lone_point(len(steps)))
    for mark in metrics.collapses:
        if mark.layer in layers:
            ax.axvline(mark.step, color=colors[layers.index(mark.layer)], ls="--", lw=1)
    positive = values[np.isfinite(values) & (values > 0)]
    # MaxVio runs from ~3 at initialisation down to ~0.05 when balanced: on a linear axis
    # every value after the first steps would sit on the floor.
    if positive.size and positive.max() / positive.min() >= 20:
        ax.set_yscale("log")
        # 0.1, 0.2, 0.5, 1...: labelled often enough to read a value off a span under a decade,
        # and as plain numbers rather than 2x10^-1.
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5), numticks=12))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="step", ylabel=label, title=label)
    _step_axis(ax, steps)
    ax.grid(alpha=0.3, which="both" if ax.get_yscale() == "log" else "major")
    collapse_key = Line2D([], [], color="grey", ls="--", lw=1, label="collapse")
    if len(layers) <= MAX_LEGEND_LAYERS:
        handles = ax.get_legend_handles_labels()[0]
        handles += [collapse_key] if metrics.collapses else []
        fig.legend(handles=handles, loc="outside right upper", fontsize="small")
    else:
        fig.colorbar(ScalarMappable(_layer_norm(layers), colormaps["viridis"]), ax=ax,
                     label="MoE layer (dashed: collapse)", pad=0.02)
    return fig


def write_plots(run_dir: Path, out: Path | None = None) -> list[Path]:
    """Write the PNGs of RUN_DIR/metrics.jsonl into `out` (default RUN_DIR/plots): loss.png,
    and for an MoE run expert_load_layer{N}.png, max_violation.png and load_entropy.png.
    Returns the paths written; empty when the file holds no step record yet."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    if not metrics.records:
        return []
    out = Path(out) if out is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    figures = {"loss.png": loss_figure(metrics)}
    moe = metrics.moe_records
    if moe:
        for layer in moe[0]["moe"]["layers"]:
            figures[f"expert_load_layer{layer}.png"] = expert_load_figure(metrics, layer)
        for key, name, label in (("max_violation_global", "max_violation.png",
                                  "MaxVio (global batch)"),
                                 ("load_entropy", "load_entropy.png",
                                  "normalised load entropy")):
            if any(key in r["moe"] for r in moe):
                figures[name] = layer_metric_figure(metrics, key, label)
    written = []
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=DPI)
        written.append(out / name)
    return written


# ---- helpers ------------------------------------------------------------------------------

def _step_axis(ax, steps: list[int]) -> None:
    """Integer step ticks; around a single step, a span of one step each side (matplotlib
    would otherwise tick fractions of a step)."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(set(steps)) == 1:
        ax.set_xlim(steps[0] - 1, steps[0] + 1)


def _lone_point(points: int) -> dict:
    """A line through one point draws nothing (a run that logged one step): mark it."""
    return {"marker": "o", "ms": 4} if points == 1 else {}


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    return fig


def _index_ticks(count: int, max_ticks: int) -> list[int]:
    """Every index up to `max_ticks` of them, else every 2nd, 4th, 8th...: expert and layer
    counts are mostly powers of 2, so the labels land on round numbers."""
    stride = 1
    while count / stride > max_ticks:
        stride *= 2
    return list(range(0, count, stride))


def _cell_edges(steps: np.ndarray) -> np.ndarray:
    """Edges halfway between consecutive steps; the outer cells as wide as their neighbour."""
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    middle = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - middle[0]], middle, [2 * steps[-1] - middle[-1]]])


def _layer_colors(layers: Sequence[int]) -> list:
    if len(layers) <= MAX_LEGEND_LAYERS:
        return [colormaps["tab10"](i) for i in range(len(layers))]
    norm = _layer_norm(layers)
    return [colormaps["viridis"](norm(layer)) for layer in layers]


def _layer_norm(layers: Sequence[int]) -> Normalize:
    return Normalize(min(layers), max(layers))
