"""Running the notebook suite headless and collecting its figures and headline numbers.

Notebooks call :func:`save_figure` and :func:`record`; both do nothing unless
``REVLENS_REPORT_DIR`` is set, which :func:`run_suite` (``revlens reproduce``) does. So running a
notebook interactively or under nbval writes no files, and the main job writes
``reports/figures/*.png``, ``reports/results/*.json``, the executed notebooks and
``reports/summary.md``.

Each run starts a fresh results set: it removes the figures, results, notebooks and summary an
earlier run wrote (a marker file records that it wrote them), so no number of a notebook not run
this time survives beside the new ones. It never removes anything else; a folder holding such
entries that it did not write is refused. A notebook that fails is saved, executed up to the
failing cell, and the error names it and the cell.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from revlens.atomic import temporary_beside, write_json_atomic, write_text_atomic
from revlens.config import check_file_name

REPORT_ENV = "REVLENS_REPORT_DIR"
MARKER = ".revlens-reproduce"
"""File in a report folder saying that :func:`run_suite` wrote the entries :data:`OWNED` there."""
OWNED: tuple[str, ...] = ("figures", "results", "notebooks", "summary.md")


def report_dir() -> Path | None:
    value = os.environ.get(REPORT_ENV)
    return Path(value) if value else None


def save_figure(fig: Figure, name: str) -> Path | None:
    """Save ``fig`` as ``figures/{name}.png`` under the report folder, if one is set (atomically)."""
    root = report_dir()
    if root is None:
        return None
    path = root / "figures" / f"{check_file_name('figure name', name)}.png"
    with temporary_beside(path) as tmp:  # a kill leaves the old figure or the new one
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
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


def start_report_dir(out: Path) -> None:
    """Make ``out`` hold a fresh results set: remove what an earlier :func:`run_suite` wrote there, nothing else.

    Entries of :data:`OWNED` that no run wrote (no :data:`MARKER`) are refused, naming them: they may
    be someone's own files. Other files in ``out`` (a sweep table, say) stay as they are.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder; choose a folder for the reports")
    present = [name for name in OWNED if (out / name).exists()]
    if present and not (out / MARKER).is_file():
        raise ValueError(f"{out} holds {', '.join(present)} that revlens reproduce did not write; refusing to "
                         "replace them: move them away or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / MARKER, f"revlens reproduce wrote {', '.join(OWNED)} in this folder and replaces them "
                                    "as a whole on its next run here.\n")
    for name in present:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _write_notebook(nb: Any, path: Path) -> None:
    """``nbformat.write`` (same bytes), atomically."""
    import nbformat

    text = nbformat.writes(nb)
    write_text_atomic(path, text if text.endswith("\n") else text + "\n")


def _failed_cell(nb: Any) -> str:
    """`` in cell N`` for the first code cell with an error output (N counts every cell from 1), else ``""``."""
    for i, cell in enumerate(nb.cells, 1):
        if cell.cell_type == "code" and any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
            return f" in cell {i}"
    return ""


def run_suite(
    notebooks: Sequence[Path], out: str | Path = "reports", timeout: int = 1800
) -> Path:
    """Execute each notebook in a fresh kernel (in order), saving outputs into ``out`` (a fresh results set).

    A failing notebook stops the run with a ValueError naming the notebook and the cell; the notebook,
    executed up to that cell, is saved under ``out/notebooks`` for inspection.
    """
    import nbformat
    from nbclient import NotebookClient
    from tqdm import tqdm

    out = Path(out).resolve()
    start_report_dir(out)
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    os.environ[REPORT_ENV] = str(out)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    timings = {}
    for path in tqdm(notebooks, desc="notebooks", unit="nb"):
        start = time.perf_counter()
        nb = nbformat.read(path, as_version=4)
        saved = out / "notebooks" / path.name
        try:
            NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
        except Exception as err:  # nbclient's CellExecutionError, CellTimeoutError, DeadKernelError
            _write_notebook(nb, saved)
            reason = f"{err.ename}: {err.evalue}" if hasattr(err, "ename") else f"{type(err).__name__}: {err}"
            raise ValueError(f"notebook {path} failed{_failed_cell(nb)} ({reason}); the notebook, executed up to "
                             f"there, is saved as {saved}") from None
        _write_notebook(nb, saved)
        timings[path.stem] = round(time.perf_counter() - start, 1)
    summary = summary_markdown(out)
    summary += "\n## Run time (s)\n\n" + "\n".join(f"- {k}: {v}" for k, v in timings.items()) + "\n"
    write_text_atomic(out / "summary.md", summary)
    return out / "summary.md"
