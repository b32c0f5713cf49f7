"""Statistics used across revlens: correlations, intervals, tests.

Each interval has one convention:

* **means over units** (seeds, persons, facts): :func:`mean_ci`, the 95% Student-t interval over the units
  (NaNs dropped; the normal 1.96 beyond 30 degrees of freedom), reported as mean and half-width
  (:func:`ci_text` writes "mean ± half-width");
* **correlations**: :func:`pearson`, :func:`spearman` (average ranks for ties) and :func:`correlation_ci`, a
  Fisher-z interval;
* **proportions**: :func:`wilson_interval`, the Wilson score interval;
* **no distributional assumption**: :func:`bootstrap_correlation`, a percentile bootstrap interval over cells
  or seeds, :func:`bootstrap_groups`, the same for any statistic, resampling groups of rows, :func:`permutation_pvalue`, an exact two-sided permutation test of a difference in means, and
  :func:`within_group_correlation`, a correlation within groups with a one-sided permutation test.

Only torch, numpy and the standard library are imported here (no other revlens module), so the real-model
code in :mod:`revlens.lm` can use these without loading the toy library.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import combinations
from statistics import NormalDist
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

if TYPE_CHECKING:
    import pandas as pd


# ---- correlations --------------------------------------------------------------------------------
def pearson(x: Float[Tensor, "... n"], y: Float[Tensor, "... n"]) -> Float[Tensor, "..."]:
    """Pearson correlation along the last axis (NaN where a side is constant)."""
    x = x - x.mean(-1, keepdim=True)
    y = y - y.mean(-1, keepdim=True)
    return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))


def average_ranks(x: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
    """Ranks 1..n along a 1-d tensor, tied values sharing the mean of their ranks.

    Ranking by ``argsort`` alone would order tied values by float noise (or by index), so a rank
    statistic over, say, ten models all at accuracy 1.000 would depend on bits; average ranks do not.
    """
    x = x.double()
    order = x.argsort()
    sorted_x = x[order]
    ranks = torch.empty_like(x)
    start = 0
    while start < len(x):
        stop = start + 1
        while stop < len(x) and sorted_x[stop] == sorted_x[start]:
            stop += 1
        ranks[order[start:stop]] = (start + stop + 1) / 2  # mean of ranks start+1 .. stop
        start = stop
    return ranks


def spearman(x: Float[Tensor, " n"], y: Float[Tensor, " n"]) -> Float[Tensor, ""]:
    """Spearman rank correlation with average ranks for ties (Pearson of the ranks)."""
    return pearson(average_ranks(torch.as_tensor(x)), average_ranks(torch.as_tensor(y)))


def correlation_ci(x: Sequence[float], y: Sequence[float], kind: str = "pearson", level: float = 0.95) -> tuple[float, float, float]:
    """Pearson or Spearman (average ranks) correlation with a Fisher-z confidence interval: ``(r, low, high)``.

    Pearson: se = 1 / sqrt(n - 3). Spearman: Fieller et al.'s se = sqrt(1.06 / (n - 3)).
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 4:
        raise ValueError(f"need two equal-length 1-d samples of at least 4 values, got {x.shape} and {y.shape}")
    tx, ty = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    if kind == "pearson":
        r, se = pearson(tx, ty).item(), 1 / np.sqrt(len(x) - 3)
    elif kind == "spearman":
        r, se = spearman(tx, ty).item(), np.sqrt(1.06 / (len(x) - 3))
    else:
        raise ValueError(f"unknown correlation {kind!r}; expected 'pearson' or 'spearman'")
    z, q = np.arctanh(np.clip(r, -0.999999, 0.999999)), NormalDist().inv_cdf(0.5 + level / 2)
    return float(r), float(np.tanh(z - q * se)), float(np.tanh(z + q * se))


def bootstrap_correlation(
    prediction: Sequence[float], measured: Sequence[Sequence[float]], over: str = "cells",
    n_boot: int = 2000, seed: int = 0, level: float = 0.95,
) -> tuple[float, float, float]:
    """Pearson correlation of a per-cell prediction with the cell means of ``measured`` ([cell, seed])
    and a percentile bootstrap interval: ``(r, low, high)``.

    ``over="cells"`` resamples cells with replacement; ``over="seeds"`` resamples the seed columns
    (one draw shared by every cell, as a seed is one training run per cell). Unlike a Fisher-z
    interval it does not assume bivariate normality, which a predictor that is mostly 0 or 1 breaks.
    Resamples in which either side is constant are skipped.
    """
    x, y = np.asarray(prediction, dtype=float), np.asarray(measured, dtype=float)
    if y.ndim != 2 or x.shape != y.shape[:1] or len(x) < 4:
        raise ValueError(f"need a prediction per cell and a [cell, seed] table for at least 4 cells, got {x.shape} and {y.shape}")
    if over not in ("cells", "seeds"):
        raise ValueError(f"unknown resampling {over!r}; expected 'cells' or 'seeds'")
    r = lambda a, b: float(np.corrcoef(a, b)[0, 1])  # noqa: E731
    gen = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        if over == "cells":
            pick = gen.integers(len(x), size=len(x))
            xs, ys = x[pick], y[pick].mean(1)
        else:
            xs, ys = x, y[:, gen.integers(y.shape[1], size=y.shape[1])].mean(1)
        if xs.std() > 0 and ys.std() > 0:
            draws.append(r(xs, ys))
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return r(x, y.mean(1)), float(low), float(high)


def _group_members(groups: Sequence) -> tuple[np.ndarray, list[np.ndarray]]:
    """Each row's group index and, per group, its rows' positions (groups compared as text)."""
    labels = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)[1]
    return labels, [np.flatnonzero(labels == k) for k in range(labels.max() + 1)]


def bootstrap_groups(statistic: Callable[[np.ndarray], float], groups: Sequence, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """Any statistic of a table's rows with a percentile bootstrap interval that resamples whole groups (cells
    whose rows share models or a prediction are not independent): ``(value, low, high)``. ``statistic`` takes an
    array of row positions (with repeats, a group drawn twice counts twice) and returns a number; ``groups``
    labels each row. Draws whose statistic is NaN are skipped."""
    labels, members = _group_members(groups)
    gen = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        value = statistic(np.concatenate([members[k] for k in gen.integers(len(members), size=len(members))]))
        if value == value:
            draws.append(value)
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return float(statistic(np.arange(len(labels)))), float(low), float(high)


# ---- means over units ----------------------------------------------------------------------------
# two-sided 95% Student-t quantiles by degrees of freedom (1..30); 1.96 beyond
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def mean_ci(values: pd.Series) -> tuple[float, float]:
    """Mean and half-width of its 95% Student-t confidence interval (NaNs dropped; the normal 1.96 beyond 30
    degrees of freedom)."""
    v = values.dropna()
    if len(v) < 2:
        return (float(v.mean()) if len(v) else float("nan")), float("nan")
    t = _T975[len(v) - 2] if len(v) - 1 <= len(_T975) else 1.96
    return float(v.mean()), float(t * v.std(ddof=1) / len(v) ** 0.5)


def ci_text(mean: float, half_width: float, digits: int = 2) -> str:
    """A mean and its interval's half-width as text, e.g. ``ci_text(*mean_ci(values))`` -> "0.38 ± 0.51"."""
    return f"{mean:.{digits}f} ± {half_width:.{digits}f}"


def permutation_pvalue(x: Sequence[float], y: Sequence[float]) -> float:
    """Exact two-sided permutation p-value for a difference in means between two small samples.

    Every split of the pooled values into groups of the original sizes is enumerated (252 splits for
    5 + 5 seeds), so no distributional assumption is made; the p-value is the share of splits whose
    absolute mean difference is at least the observed one.
    """
    pooled = [float(v) for v in (*x, *y)]
    n, total = len(x), sum(pooled)
    if not len(x) or not len(y):
        raise ValueError("both samples need at least one value")

    def gap(first: Sequence[float]) -> float:
        return abs(sum(first) / n - (total - sum(first)) / (len(pooled) - n))

    observed = gap(pooled[:n])
    splits = [gap([pooled[i] for i in idx]) for idx in combinations(range(len(pooled)), n)]
    return sum(g >= observed - 1e-12 for g in splits) / len(splits)


def within_group_correlation(x: Sequence[float], y: Sequence[float], groups: Sequence, n_permutations: int = 10000,
                             seed: int = 0) -> tuple[float, float]:
    """Pearson correlation of ``x`` and ``y`` after subtracting each group's mean from both (what varies inside
    the groups, e.g. seed to seed within a cell), and its one-sided permutation p-value: the share of
    ``n_permutations`` shuffles of ``x`` among the members of each group (group means kept) whose correlation
    is at least the observed one, counting the observed arrangement (``(k + 1) / (n + 1)``). ``(r, p)``; r is NaN
    when nothing varies within the groups."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keys, members = _group_members(groups)
    if not (x.shape == y.shape == keys.shape) or x.ndim != 1:
        raise ValueError(f"x, y and groups need one value per unit, got {x.shape}, {y.shape}, {keys.shape}")

    def centred(v: np.ndarray) -> np.ndarray:
        out = v.copy()
        for idx in members:
            out[idx] -= v[idx].mean()
        return out

    dy = centred(y)

    def r(dx: np.ndarray) -> float:
        norm = np.sqrt((dx ** 2).sum() * (dy ** 2).sum())
        return float((dx * dy).sum() / norm) if norm > 0 else float("nan")

    dx = centred(x)
    observed = r(dx)
    if observed != observed:
        return observed, float("nan")
    rng = np.random.default_rng(seed)
    shuffled = dx.copy()
    hits = 0
    for _ in range(n_permutations):
        for idx in members:
            shuffled[idx] = dx[rng.permutation(idx)]
        hits += r(shuffled) >= observed - 1e-12
    return observed, (hits + 1) / (n_permutations + 1)


# ---- proportions ---------------------------------------------------------------------------------
def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default)."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)  # it lies in [0, 1]; clip the rounding at 0 / n and n / n
