"""Statistics over the routing sweep table's cells (one row per model, grouped by delta and base).

Correlation intervals such as :func:`revlens.stats.correlation_ci` are in :mod:`revlens.stats`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def within_delta_agreement(deltas: Sequence[int], predicted: Sequence[float], measured: Sequence[float],
                           n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """How much of a per-cell predictor's fit to measured cell means is more than the pattern in delta.

    One entry per (delta, base) cell. ``delta_only_r``: Pearson of ``measured`` with its own mean per delta,
    the largest Pearson any rule that reads delta but not the base can reach (the correlation ratio);
    ``predicted_r``: Pearson of ``predicted`` with ``measured``. The within-delta test uses only the deltas
    where ``predicted`` is not the same for every cell (``within_deltas``): ``within_r`` is the Pearson, over
    those cells (``n_within``), of each side's deviation from its mean at the cell's delta, with a percentile
    bootstrap interval that resamples deltas (``within_low``, ``within_high``; a delta's deviations sum to
    zero, so its cells are not independent); ``pairs_concordant`` / ``pairs_discordant``: pairs of cells at
    one delta that ``predicted`` orders strictly and ``measured`` orders the same / the other way
    (``pairs_tied``: ``measured`` equal); ``pairs_unordered``: pairs ``predicted`` scores equally."""
    import numpy as np

    d, x, y = (np.asarray(v, dtype=float) for v in (deltas, predicted, measured))
    if not d.shape == x.shape == y.shape or d.ndim != 1:
        raise ValueError(f"need one delta, prediction and measurement per cell, got {d.shape}, {x.shape}, {y.shape}")
    groups = {k: np.flatnonzero(d == k) for k in np.unique(d)}
    centred = {k: (x[i] - x[i].mean(), y[i] - y[i].mean()) for k, i in groups.items()}
    y_by_delta = np.array([y[groups[k]].mean() for k in d])
    within = [k for k, (dx, _) in centred.items() if np.ptp(dx) > 1e-12]
    if len(within) < 2:
        raise ValueError(f"the prediction differs within fewer than 2 deltas ({within}): no within-delta test")
    r = lambda keys: float(np.corrcoef(np.concatenate([centred[k][0] for k in keys]),  # noqa: E731
                                       np.concatenate([centred[k][1] for k in keys]))[0, 1])
    gen, draws = np.random.default_rng(seed), []
    for _ in range(n_boot):
        keys = [within[i] for i in gen.integers(len(within), size=len(within))]
        if len(set(keys)) > 1:
            draws.append(r(keys))
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    pairs = {"concordant": 0, "discordant": 0, "tied": 0, "unordered": 0}
    for i in groups.values():
        for a, b in ((a, b) for n, a in enumerate(i) for b in i[n + 1:]):
            dx, dy = x[a] - x[b], y[a] - y[b]
            pairs["unordered" if abs(dx) <= 1e-12 else "tied" if dy == 0 else "concordant" if dx * dy > 0 else "discordant"] += 1
    return {"delta_only_r": float(np.corrcoef(y_by_delta, y)[0, 1]), "predicted_r": float(np.corrcoef(x, y)[0, 1]),
            "within_r": r(within), "within_low": float(low), "within_high": float(high),
            "within_deltas": [int(k) if float(k).is_integer() else float(k) for k in within],
            "n_within": int(sum(len(groups[k]) for k in within)), **{f"pairs_{k}": v for k, v in pairs.items()}}


def misrouted_cells(rows: Any, guess: float = 1 / 3):
    """Per (base, delta) cell of routing table rows (a DataFrame, one row per model): the reverse accuracy's
    mean and its largest value over seeds, the reverse query's mean attention on B and on each distractor;
    ``below_guess``: every seed answers the reverse query below ``guess`` (default 1/3, a guess among B and
    its two distractors), and ``misrouted``: below the guess while the mask attends more to each distractor
    than to B (the reverse route is sent to a distractor, not merely spread out)."""
    cells = rows.groupby(["base", "delta"]).agg(
        n=("seed", "size"), reverse=("reverse_acc", "mean"), reverse_max=("reverse_acc", "max"),
        attn_b=("reverse_attn_b", "mean"), attn_d=("reverse_attn_d", "mean")).reset_index()
    cells["below_guess"] = cells.reverse_max < guess
    cells["misrouted"] = cells.below_guess & (cells.attn_d > cells.attn_b)
    return cells


def compare_by_delta(first: Any, second: Any, column: str):
    """Two sets of routing rows (DataFrames, one row per model) side by side per delta they share: each
    side's mean of ``column`` over its models and the half-width of its 95% Student-t interval
    (:func:`revlens.stats.mean_ci`), and ``apart``: the two intervals do not overlap."""
    import pandas as pd

    from revlens.stats import mean_ci

    out = []
    for delta in sorted(set(first.delta) & set(second.delta)):
        (m1, h1), (m2, h2) = (mean_ci(rows.loc[rows.delta == delta, column]) for rows in (first, second))
        out.append({"delta": int(delta), "mean_first": m1, "half_first": h1, "mean_second": m2, "half_second": h2,
                    "apart": bool(m1 - h1 > m2 + h2 or m2 - h2 > m1 + h1)})
    return pd.DataFrame(out).set_index("delta")
