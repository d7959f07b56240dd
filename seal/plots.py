"""The figures of the run comparison (`python -m seal.report`), drawn on matplotlib's Agg canvas, so no
display is needed. seal/report.py prepares plain numbers; each function here draws one PNG.

accuracy_by_template.png  knowledge: accuracy of each condition, grouped by configuration (the template when
                          only `self_edit.name` varies), the best bar marked and its lead named
success_by_template.png   few-shot: the same for the share of ARC tasks solved
rl_curve.png              eval accuracy after each ReST-EM round, one line per run, its 95 % CI as a band
retention.png             continual runs: each run's retention matrix; otherwise reasoning accuracy before
                          and after the updates and the prior knowledge retained, runs × measures
cost.png                  seconds per phase (stacked) and peak memory per phase, per run
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# configuration -> condition -> (value, half-width of its 95 % interval, None when unknown)
Bars = dict[str, dict[str, tuple[float, float | None]]]


def _figure(
    width: float, height: float, rows: int = 1, cols: int = 1, sharey: bool = False
) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False, sharey=sharey)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path


def headline(bars: Bars) -> str:
    """The condition a reader compares first: SEAL after RL, else the self-edits, else the last one."""
    conditions = list(dict.fromkeys(c for values in bars.values() for c in values))
    return next((c for c in ("seal", "self_edit") if c in conditions), conditions[-1])


def best_note(bars: Bars) -> tuple[str, tuple[str, str]]:
    """Which bar won and by how much: the configurations compared on the headline condition, or, with a
    single configuration, its conditions compared. Returns the sentence and the best bar."""
    condition = headline(bars)
    scores = {config: values[condition][0] for config, values in bars.items() if condition in values}
    if len(scores) > 1:
        (best, top), (second, runner) = sorted(scores.items(), key=lambda item: -item[1])[:2]
        return f"best {condition}: {best} {top:.2f}, {top - runner:+.2f} over {second}", (best, condition)
    [config] = scores
    ranked = sorted(bars[config].items(), key=lambda item: -item[1][0])
    best, (top, _) = ranked[0]
    if len(ranked) == 1:
        return f"{best}: {top:.2f}", (config, best)
    second, (runner, _) = ranked[1]
    return f"best condition: {best} {top:.2f}, {top - runner:+.2f} over {second}", (config, best)


def condition_bars(bars: Bars, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    """Grouped bars, one group per configuration and one bar per condition, each labelled with its value;
    error bars are the 95 % interval, cut at 0 and 1."""
    configs = list(bars)
    conditions = list(dict.fromkeys(c for values in bars.values() for c in values))
    note, best = best_note(bars)
    width = 0.8 / len(conditions)
    fig, [[ax]] = _figure(max(6.0, 1.5 + 0.5 * len(configs) * len(conditions)), 4.8)
    for j, condition in enumerate(conditions):
        shown = [
            (i, *bars[config][condition]) for i, config in enumerate(configs) if condition in bars[config]
        ]
        xs = [i - 0.4 + width * (j + 0.5) for i, _, _ in shown]
        values = np.array([value for _, value, _ in shown])
        halves = np.array([half or 0.0 for _, _, half in shown])
        errors = [np.minimum(halves, values), np.minimum(halves, 1 - values)]
        drawn = ax.bar(xs, values, width, yerr=errors, capsize=3, label=condition)
        marked = [(configs[i], condition) == best for i, _, _ in shown]
        for patch, mark in zip(drawn, marked, strict=True):
            if mark:
                patch.set_edgecolor("black")
                patch.set_linewidth(2)
        labels = [f"{v:.2f}" + (" ★" if mark else "") for v, mark in zip(values, marked, strict=True)]
        ax.bar_label(drawn, labels, padding=2, fontsize=8)
    rotated = len(configs) > 3 or any(len(config) > 16 for config in configs)
    ax.set_xticks(
        range(len(configs)), configs, rotation=20 if rotated else 0, ha="right" if rotated else "center"
    )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.15)
    ax.legend(title="condition", fontsize=8)
    ax.set_title(note + " (★)", fontsize=10)
    fig.suptitle(title)
    fig.supxlabel(
        "error bars: 95 % interval across seeds, or the run's own 95 % CI with one seed", fontsize=8
    )
    return _save(fig, path)


def rl_curves(curves: dict[str, list[tuple[int, float, float]]], path: Path) -> Path:
    """Eval accuracy per RL round, one line per run; the band is the 95 % CI, the last value is written."""
    fig, [[ax]] = _figure(7.0, 4.5)
    for label, points in curves.items():
        rounds, values, halves = (np.array(column) for column in zip(*points, strict=True))
        ax.plot(rounds, values, marker="o", label=label)
        ax.fill_between(rounds, np.clip(values - halves, 0, 1), np.clip(values + halves, 0, 1), alpha=0.15)
        ax.annotate(f"{values[-1]:.2f}", (rounds[-1], values[-1]), textcoords="offset points", xytext=(5, 0))
    ax.set_xticks(sorted({k for points in curves.values() for k, _, _ in points}))
    ax.set_xlabel("RL round (0: before RL)")
    ax.set_ylabel("accuracy on the evaluation passages")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.suptitle("ReST-EM: knowledge accuracy with the self-edits of each round (band: 95 % CI)")
    return _save(fig, path)


def _heatmap(ax: Axes, matrix: np.ndarray) -> Any:
    """An annotated accuracy heatmap; a missing (NaN) cell is left blank and written as –."""
    image = ax.imshow(np.ma.masked_invalid(matrix), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for (r, c), value in np.ndenumerate(matrix):
        text, colour = ("–", "k") if math.isnan(value) else (f"{value:.2f}", "w" if value < 0.6 else "k")
        ax.text(c, r, text, ha="center", va="center", color=colour, fontsize=8)
    return image


def retention_matrices(matrices: dict[str, dict[str, Any]], path: Path) -> Path:
    """One retention matrix per continual run: row r is the model after r edits, column i passage i."""
    cols = min(3, len(matrices))
    rows = math.ceil(len(matrices) / cols)
    fig, axes = _figure(max(6.0, 1.0 + 3.5 * cols), 0.8 + 3.2 * rows, rows, cols)
    flat = list(axes.flat)
    for ax, (label, retention) in zip(flat, matrices.items(), strict=False):
        matrix = np.array(retention["accuracy"], dtype=float)
        image = _heatmap(ax, matrix)
        ax.set_xticks(range(matrix.shape[1]))
        ax.set_yticks(range(matrix.shape[0]))
        ax.set_xlabel("passage (in edit order)")
        ax.set_ylabel("edits merged")
        ax.set_title(f"{label}\n({retention.get('condition', '')})", fontsize=9)
    for ax in flat[len(matrices) :]:
        ax.set_axis_off()
    fig.colorbar(image, ax=flat, label="accuracy")
    fig.suptitle("Retention: accuracy per passage after each edit")
    return _save(fig, path)


def retention_summary(rows: dict[str, list[float | None]], columns: list[str], path: Path) -> Path:
    """Runs × (reasoning before, reasoning after update, prior knowledge retained)."""
    matrix = np.array([[math.nan if v is None else v for v in values] for values in rows.values()])
    fig, [[ax]] = _figure(4.0 + 1.8 * len(columns), 2.0 + 0.5 * len(rows))
    image = _heatmap(ax, matrix)
    ax.set_xticks(range(len(columns)), columns, rotation=20, ha="right")
    ax.set_yticks(range(len(rows)), list(rows))
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.suptitle("What the updates cost: reasoning accuracy and prior knowledge retained")
    return _save(fig, path)


def costs(times: dict[str, dict[str, float]], memory: dict[str, dict[str, float]], path: Path) -> Path:
    """One row per run. Left: seconds per phase, stacked. Right: each phase's peak memory, side by side."""
    labels = list(dict.fromkeys([*times, *memory]))
    fig, [[left, right]] = _figure(12.0, 2.0 + 0.5 * len(labels), 1, 2, sharey=True)
    ys = np.arange(len(labels))
    start = np.zeros(len(labels))
    for phase in dict.fromkeys(p for t in times.values() for p in t):
        seconds = np.array([times.get(label, {}).get(phase, 0.0) for label in labels])
        left.barh(ys, seconds, left=start, label=phase)
        start += seconds
    left.set_title("time per phase (stacked)")
    left.set_xlabel("seconds")
    phases = list(dict.fromkeys(p for m in memory.values() for p in m))
    for j, phase in enumerate(phases):
        height = 0.8 / len(phases)
        peaks = [memory.get(label, {}).get(phase, 0.0) for label in labels]
        right.barh(ys - 0.4 + height * (j + 0.5), peaks, height, label=phase)
    right.set_title("peak memory per phase")
    right.set_xlabel("MB")
    left.set_yticks(ys, labels, fontsize=8)
    left.invert_yaxis()  # the first run on top, as in report.md
    for ax in (left, right):
        if ax.get_legend_handles_labels()[0]:  # a panel without data has no legend
            ax.legend(title="phase", fontsize=8)
    fig.suptitle("Cost of each run")
    return _save(fig, path)
