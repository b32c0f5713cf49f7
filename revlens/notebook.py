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
