"""revlens.stats: the one home of the statistics (correlations, intervals, tests) and its text formatter."""

import importlib
import inspect
import math

import numpy as np
import pandas as pd
import pytest

import revlens.stats
from revlens.stats import ci_text, mean_ci

MOVED = {
    "revlens.theory": ("pearson", "spearman", "average_ranks"),
    "revlens.experiments": ("mean_ci", "permutation_pvalue"),
    "revlens.tables": ("mean_ci",),
    **{f"revlens.routing.{m}": ("correlation_ci", "bootstrap_correlation")
       for m in ("world", "predictors", "measures", "sweep", "cells")},
    "revlens.lm.denoising": ("wilson_interval",),
}


def test_ci_text_writes_mean_plus_minus_half_width():
    assert ci_text(0.38, 0.51) == "0.38 ± 0.51"
    assert ci_text(0.3849, 0.5061, digits=3) == "0.385 ± 0.506"
    assert ci_text(1.0, 0.25, digits=0) == "1 ± 0"
    assert ci_text(float("nan"), float("nan")) == "nan ± nan"
    assert ci_text(*mean_ci(pd.Series([1.0, 2.0, 3.0]))) == "2.00 ± 2.48"


@pytest.mark.parametrize(("old", "name"), [(old, name) for old, names in MOVED.items() for name in names])
def test_moved_names_live_in_stats_only(old, name):
    value = getattr(revlens.stats, name)
    assert callable(value) and value.__module__ == "revlens.stats"
    module = importlib.import_module(old)
    # the old module may use the function, imported from revlens.stats, but defines no copy of its own
    assert getattr(module, name, value) is value
    assert f"def {name}(" not in inspect.getsource(module)


def test_mean_ci_uses_student_t():
    mean, half = mean_ci(pd.Series([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert mean == 3.0
    assert half == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5), rel=1e-3)
    assert math.isnan(mean_ci(pd.Series([1.0]))[1])


def test_permutation_pvalue_is_exact_on_small_samples():
    from revlens.stats import permutation_pvalue

    # fully separated 5 + 5 samples: only the observed split and its mirror are as extreme -> 2 / 252
    assert permutation_pvalue([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]) == pytest.approx(2 / 252)
    assert permutation_pvalue([1, 1, 1], [1, 1, 1]) == 1.0
    with pytest.raises(ValueError, match="at least one value"):
        permutation_pvalue([], [1.0])


def test_within_group_correlation_removes_group_means_and_tests_by_shuffling_within_groups():
    from revlens.stats import within_group_correlation

    groups = ["a"] * 5 + ["b"] * 5
    y = [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]
    r, p = within_group_correlation([5, 6, 7, 8, 9, 0, 1, 2, 3, 4], y, groups, n_permutations=2000)
    assert r == pytest.approx(1.0) and p < 0.01  # across groups the two anti-correlate; within, they agree
    r, p = within_group_correlation([4, 3, 2, 1, 0, 4, 3, 2, 1, 0], y, groups, n_permutations=2000)
    assert r == pytest.approx(-1.0) and p > 0.99  # one-sided: a negative correlation is no evidence
    r, p = within_group_correlation([1] * 10, y, groups)
    assert math.isnan(r) and math.isnan(p)
    with pytest.raises(ValueError, match="one value per unit"):
        within_group_correlation([1, 2], [1, 2, 3], ["a", "a", "b"])


def test_bootstrap_groups_resamples_whole_groups():
    from revlens.stats import bootstrap_groups

    values = np.array([1.0, 1.0, 1.0, 3.0, 3.0, 3.0])
    groups = ["a", "a", "a", "b", "b", "b"]
    value, low, high = bootstrap_groups(lambda idx: values[idx].mean(), groups, n_boot=500)
    assert value == 2.0 and low == 1.0 and high == 3.0  # a draw is all-a, all-b or half and half
    same = bootstrap_groups(lambda idx: values[idx].mean(), ["x"] * 6, n_boot=50)
    assert same == (2.0, 2.0, 2.0)
