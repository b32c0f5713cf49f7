"""Figures shared by the notebooks (matplotlib only, Agg-safe)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from revlens.world import EVAL_SETS

SET_LABELS = {
    "forward": "forward\nA r [M] → B",
    "inplace": "in-place\n[M] r B → A",
    "reverse": "reverse\nB r [M] → A",
    "control_reverse": "control reverse\n(trained both ways)",
}

MAX_WIDTH = 10.0
"""Widest figure in inches: at the notebook's default 100 dpi it fits a JupyterLab output area beside the sidebar."""


def accuracy_bars(table: pd.DataFrame, chance: float, sets: Sequence[str] = EVAL_SETS) -> Figure:
    """Grouped bars of mean accuracy per setting and eval set, one dot per seed, chance as a line.

    Undefined cells (NaN, e.g. in-place for a left-to-right model) are drawn as "n/a".
    """
    settings = list(dict.fromkeys(table["setting"]))
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / len(settings)
    x = np.arange(len(sets))
    for i, name in enumerate(settings):
        rows = table[table["setting"] == name]
        offset = x - 0.4 + (i + 0.5) * width
        means = [rows[s].mean() for s in sets]
        ax.bar(offset, np.nan_to_num(means), width, label=name, alpha=0.8)
        for j, s in enumerate(sets):
            if np.isnan(means[j]):
                ax.text(offset[j], 0.02, "n/a", ha="center", fontsize=8, rotation=90)
            else:
                ax.scatter(np.full(len(rows), offset[j]), rows[s], s=8, color="k", zorder=3)
    ax.axhline(chance, color="grey", ls="--", lw=1, label=f"chance = {chance:.3f}")
    ax.set_xticks(x, [SET_LABELS.get(s, s) for s in sets])
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, ncol=len(settings) + 1, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    fig.tight_layout()
    return fig


METRIC_TITLES = {
    "loss": "training loss (each objective's own)",
    "forward_acc": "forward accuracy",
    "inplace_acc": "in-place accuracy ([M] r B → A)",
    "reverse_acc": "reverse accuracy (never trained)",
    "control_reverse_acc": "control reverse accuracy (trained both ways)",
}
"""Panel titles for :func:`training_curves`, by history column; other columns are shown as named."""


def training_curves(history: pd.DataFrame, metrics: Sequence[str], chance: float | None = None) -> Figure:
    """One panel per metric: mean over seeds per setting (line) and each seed (thin line).

    Four metrics make a 2 x 2 grid, otherwise at most three panels a row; the figure is at most
    :data:`MAX_WIDTH` inches wide, and the legend sits below the panels, outside the data.
    """
    ncols = 2 if len(metrics) == 4 else min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(min(MAX_WIDTH, 4.5 * ncols), 2.8 * nrows + 0.6), squeeze=False,
                             layout="constrained")
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    for ax, metric in zip(axes.flat, metrics):
        for k, (name, rows) in enumerate(history.groupby("setting", sort=False)):
            color = f"C{k}"
            for _, seed_rows in rows.groupby("seed"):
                ax.plot(seed_rows["step"], seed_rows[metric], color=color, lw=0.5, alpha=0.4)
            mean = rows.groupby("step")[metric].mean()
            ax.plot(mean.index, mean.values, color=color, lw=2, label=name)
        if chance is not None and metric.endswith("_acc"):
            ax.axhline(chance, color="grey", ls="--", lw=1, label=f"chance = {chance:.3f}")
        ax.set_title(METRIC_TITLES.get(metric, metric))
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy" if metric.endswith("_acc") else metric)
    # the legend of the panel with the most entries (an accuracy panel also has the chance line)
    handles, labels = max((ax.get_legend_handles_labels() for ax in axes.flat), key=lambda hl: len(hl[1]))
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=9, frameon=False)
    return fig


def grid_heatmaps(
    grids: dict[str, np.ndarray],
    *,
    xlabel: str,
    ylabel: str = "layer",
    xticklabels: Sequence[str] | None = None,
    cmap: str = "RdBu_r",
    symmetric: bool = True,
    colorbar_label: str = "",
) -> Figure:
    """[layer x something] heatmaps on one colour scale (route correlations, patching maps), at most three a row.

    The figure is at most :data:`MAX_WIDTH` inches wide.
    """
    values = np.concatenate([np.asarray(g, dtype=float).ravel() for g in grids.values()])
    finite = values[np.isfinite(values)]
    top = float(np.abs(finite).max()) if finite.size else 1.0
    vmin, vmax = (-top, top) if symmetric else (float(finite.min()), float(finite.max()))
    nrows = math.ceil(len(grids) / 3)
    ncols = math.ceil(len(grids) / nrows)  # four grids: two rows of two, not three and one
    fig, axes = plt.subplots(nrows, ncols, figsize=(min(MAX_WIDTH, 3.0 * ncols + 1.0), 3.0 * nrows), squeeze=False,
                             layout="constrained")
    for ax in list(axes.flat)[len(grids):]:
        ax.set_visible(False)
    for ax, (title, grid) in zip(axes.flat, grids.items()):
        grid = np.asarray(grid, dtype=float)
        image = ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_yticks(range(grid.shape[0]))
        if xticklabels is not None:
            ax.set_xticks(range(len(xticklabels)), xticklabels, rotation=60, fontsize=7)
        else:
            ax.set_xticks(range(grid.shape[1]))
    fig.colorbar(image, ax=list(axes.flat)[: len(grids)], label=colorbar_label, shrink=0.85)
    return fig
