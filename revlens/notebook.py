"""One-call set-up shared by every notebook, so no notebook repeats environment boilerplate."""

from __future__ import annotations

import os
import warnings


def setup(threads: int = 2) -> None:
    """Offline hub, deterministic-size thread pool, quiet tqdm-without-widgets warning, pandas display."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tqdm import TqdmWarning

    warnings.filterwarnings("ignore", category=TqdmWarning)  # text progress bars without ipywidgets
    import pandas as pd
    import torch

    torch.set_num_threads(threads)
    pd.set_option("display.precision", 3)
    pd.set_option("display.width", 120)


def strip_stderr(path: str) -> int:
    """Remove stderr stream outputs and per-cell execution timestamps from an executed notebook, in place.

    Progress bars are for the person watching a run; committed as hundreds of ``\\r`` frames they are
    noise in the file and its diffs. So are the times nbclient (``jupyter nbconvert --execute``) writes
    into every cell's ``metadata.execution``, which change on every run. Returns the number of outputs
    removed.
    """
    import nbformat

    nb = nbformat.read(path, as_version=4)
    removed = 0
    for cell in nb.cells:
        cell.get("metadata", {}).pop("execution", None)
        if cell.cell_type == "code":
            kept = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
            removed += len(cell.outputs) - len(kept)
            cell.outputs = kept
    nbformat.write(nb, path)
    return removed


if __name__ == "__main__":  # python -m revlens.notebook NOTEBOOK.ipynb ...
    import sys

    for notebook in sys.argv[1:]:
        print(f"{notebook}: removed {strip_stderr(notebook)} stderr outputs and the execution timestamps")
