import math

import pandas as pd
import pytest

from revlens.experiments import SETTINGS, ci_table, train_setting
from revlens.stats import mean_ci
from revlens.training import TrainConfig


def test_mean_ci_uses_student_t():
    mean, half = mean_ci(pd.Series([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert mean == 3.0
    assert half == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5), rel=1e-3)
    assert math.isnan(mean_ci(pd.Series([1.0]))[1])
    table = pd.DataFrame({"setting": ["a", "a", "b"], "x": [1.0, 3.0, float("nan")]})
    assert ci_table(table, ["x"]).loc["b", "x"] == "n/a"


def test_cache_serves_identical_runs_and_keys_on_the_config(small_world, tmp_path):
    setting = SETTINGS["ARM"]
    cfg = TrainConfig(steps=20, batch_size=16, log_every=10)
    first = train_setting(setting, small_world, [0, 1], cfg, cache_dir=tmp_path, progress=False)
    again = train_setting(setting, small_world, [0, 1], cfg, cache_dir=tmp_path, progress=False)
    assert len(list((tmp_path / "runs").iterdir())) == 1
    for a, b in zip(first, again):
        assert "cos_all" in a.history[-1] and len(a.history) == len(b.history)
        for row_a, row_b in zip(a.history, b.history):
            assert row_a == pytest.approx(row_b, nan_ok=True)
        for p, q in zip(a.model.parameters(), b.model.parameters()):
            assert (p == q).all()
    train_setting(setting, small_world, [0, 1], TrainConfig(steps=21, batch_size=16, log_every=10),
                  cache_dir=tmp_path, progress=False)
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_permutation_pvalue_is_exact_on_small_samples():
    from revlens.stats import permutation_pvalue

    # fully separated 5 + 5 samples: only the observed split and its mirror are as extreme -> 2 / 252
    assert permutation_pvalue([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]) == pytest.approx(2 / 252)
    assert permutation_pvalue([1, 1, 1], [1, 1, 1]) == 1.0
    with pytest.raises(ValueError, match="at least one value"):
        permutation_pvalue([], [1.0])
