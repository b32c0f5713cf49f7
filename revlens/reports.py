"""Running the notebook suite headless and collecting its figures and headline numbers.

Notebooks call :func:`save_figure` and :func:`record`; both do nothing unless
``REVLENS_REPORT_DIR`` is set, which :func:`run_suite` (``revlens reproduce``) does. So running a
notebook interactively or under nbval writes no files, and the main job writes
``reports/figures/*.png``, ``reports/results/*.json``, the executed notebooks and
``reports/summary.md``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from revlens.atomic import write_json_atomic
from revlens.config import check_file_name

REPORT_ENV = "REVLENS_REPORT_DIR"


def report_dir() -> Path | None:
    value = os.environ.get(REPORT_ENV)
    return Path(value) if value else None


def save_figure(fig: Figure, name: str) -> Path | None:
    """Save ``fig`` as ``figures/{name}.png`` under the report folder, if one is set."""
    root = report_dir()
    if root is None:
        return None
    path = root / "figures" / f"{check_file_name('figure name', name)}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def record(notebook: str, results: Mapping[str, Any]) -> Path | None:
    """Merge headline numbers of ``notebook`` into ``results/{notebook}.json``, if a folder is set."""
    root = report_dir()
    if root is None:
        return None
    path = root / "results" / f"{check_file_name('notebook name', notebook)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(path.read_text()) if path.is_file() else {}
    existing.update(results)
    write_json_atomic(path, existing, default=float)
    return path


def notebook_paths(folder: str | Path = "notebooks") -> list[Path]:
    paths = sorted(Path(folder).glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no numbered notebooks (NN_name.ipynb) in {folder}")
    return paths


def summary_markdown(root: Path) -> str:
    lines = ["# revlens results summary", "", "Headline numbers recorded by each notebook.", ""]
    for path in sorted((root / "results").glob("*.json")):
        lines += [f"## {path.stem}", ""]
        for key, value in json.loads(path.read_text()).items():
            lines.append(f"- **{key}**: {value}")
        lines.append("")
    figures = sorted((root / "figures").glob("*.png"))
    if figures:
        lines += ["## Figures", ""] + [f"![{f.stem}](figures/{f.name})" for f in figures] + [""]
    return "\n".join(lines)


def run_suite(
    notebooks: Sequence[Path], out: str | Path = "reports", timeout: int = 1800
) -> Path:
    """Execute each notebook in a fresh kernel (in order), saving outputs into ``out``."""
    import nbformat
    from nbclient import NotebookClient
    from tqdm import tqdm

    out = Path(out).resolve()
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    os.environ[REPORT_ENV] = str(out)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    timings = {}
    for path in tqdm(notebooks, desc="notebooks", unit="nb"):
        start = time.perf_counter()
        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
        nbformat.write(nb, out / "notebooks" / path.name)
        timings[path.stem] = round(time.perf_counter() - start, 1)
    summary = summary_markdown(out)
    summary += "\n## Run time (s)\n\n" + "\n".join(f"- {k}: {v}" for k, v in timings.items()) + "\n"
    (out / "summary.md").write_text(summary)
    return out / "summary.md"
