"""Result tables of trained settings: final metrics per seed, their summaries over seeds, training curves.

Each takes the runs of :func:`revlens.experiments.train_setting` by setting name (or a table made from them)
and returns a pandas DataFrame for a notebook to print or plot; kept apart from training and the run cache,
which they never touch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from revlens.stats import ci_text, mean_ci
from revlens.training import TrainRun
from revlens.world import EVAL_SETS


def metrics_table(runs_by_setting: Mapping[str, Sequence[TrainRun]]) -> pd.DataFrame:
    """One row per (setting, seed) with the final accuracies and chance."""
    rows = []
    for name, runs in runs_by_setting.items():
        for run in runs:
            m = run.metrics
            rows.append({"setting": name, "seed": run.seed, **{s: m[f"{s}_acc"] for s in EVAL_SETS}, "chance": m["chance"]})
    return pd.DataFrame(rows)


def summarise(table: pd.DataFrame, columns: Sequence[str] = EVAL_SETS) -> pd.DataFrame:
    """Mean, min and max over seeds of each column, per setting (NaN where undefined)."""
    grouped = table.groupby("setting", sort=False)[list(columns)]
    out = pd.concat({"mean": grouped.mean(), "min": grouped.min(), "max": grouped.max()}, axis=1)
    return out.swaplevel(axis=1).reindex(columns=list(columns), level=0)


def ci_table(table: pd.DataFrame, columns: Sequence[str], by: str = "setting") -> pd.DataFrame:
    """"mean ± half-width" strings per group (rounded to 2 decimals), rows in first-seen order."""
    out = {}
    for name, rows in table.groupby(by, sort=False):
        cells = {}
        for c in columns:
            mean, half = mean_ci(rows[c])
            cells[c] = "n/a" if pd.isna(mean) else ci_text(mean, half)
        out[name] = cells
    return pd.DataFrame(out).T


def history_frame(runs_by_setting: Mapping[str, Sequence[TrainRun]]) -> pd.DataFrame:
    """Long-format training curves: setting, seed, step, loss and every logged metric."""
    rows = [
        {"setting": name, "seed": run.seed, **row}
        for name, runs in runs_by_setting.items()
        for run in runs
        for row in run.history
    ]
    return pd.DataFrame(rows)
