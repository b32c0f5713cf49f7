"""revlens.stats: the one home of the statistics (correlations, intervals, tests) and its text formatter."""

import importlib
import inspect

import pandas as pd
import pytest

import revlens.stats
from revlens.stats import ci_text, mean_ci

MOVED = {
    "revlens.theory": ("pearson", "spearman", "average_ranks"),
    "revlens.experiments": ("mean_ci", "permutation_pvalue"),
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
