"""revlens.tables: result tables over the seeds of trained settings."""

import pandas as pd

from revlens.tables import ci_table


def test_ci_table_writes_n_a_where_the_mean_is_undefined():
    table = pd.DataFrame({"setting": ["a", "a", "b"], "x": [1.0, 3.0, float("nan")]})
    assert ci_table(table, ["x"]).loc["b", "x"] == "n/a"
