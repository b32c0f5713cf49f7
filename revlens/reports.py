"""Running the notebook suite headless and collecting its figures and headline numbers.

Notebooks call :func:`save_figure` and :func:`record`; both do nothing unless
``REVLENS_REPORT_DIR`` is set, which :func:`run_suite` (``revlens reproduce``) does. So running a
notebook interactively or under nbval writes no files, and the main job writes
``reports/figures/*.png``, ``reports/results/*.json``, the executed notebooks and
``reports/summary.md``.

Each run makes a fresh results set: it removes the figures, results, notebooks and summary an
earlier run wrote (a marker file records that it wrote them), so no number of a notebook not run
this time survives beside the new ones. It never removes anything else; a folder holding such
entries that it did not write is refused. A notebook that fails or runs past the cell timeout is
saved, executed up to the failing cell, and the error names it and the cell.

A run that stops (a failure, a timeout, Ctrl-C) resumes where it stopped: the marker file records,
for every notebook that ran to the end, the sha256 of its source, of the ``revlens`` package sources
and of its saved executed copy, and the files it wrote. A rerun keeps such a notebook and its files
when all of these still match, and executes everything else afresh.

While a notebook runs, its kernel reports training to a progress file (``$REVLENS_PROGRESS_FILE``,
see :class:`revlens.training.StepProgress`) instead of drawing bars into the cell outputs, and
:class:`TrainingProgress` shows that training on this process's stderr as one bar per notebook.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from tqdm import tqdm

from revlens.atomic import temporary_beside, write_json_atomic, write_text_atomic
from revlens.config import check_file_name
from revlens.training import PROGRESS_ENV

REPORT_ENV = "REVLENS_REPORT_DIR"
MARKER = ".revlens-reproduce"
"""File in a report folder saying that :func:`run_suite` wrote the entries :data:`OWNED` there.

It is JSON: a note for a person, the package hash of the run and one entry per finished notebook
(see :func:`run_suite`), from which a rerun resumes.
"""
MARKER_NOTE = ("revlens reproduce wrote figures, results, notebooks and summary.md in this folder and replaces them "
               "on its next run here (keeping the notebooks recorded below when nothing they depend on changed).")
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


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def package_sha256() -> str:
    """sha256 over every ``.py`` file of the ``revlens`` package (subpackages included), by relative path.

    A notebook executed by other library code is not reused by a resumed run.
    """
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" not in path.parts:
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def read_record(out: Path) -> dict[str, Any]:
    """The finished-notebook record in ``out``'s marker, or an empty one (no marker, or not a record)."""
    try:
        data = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return {"notebooks": {}}
    if not isinstance(data, dict) or not isinstance(data.get("notebooks"), dict):
        return {"notebooks": {}}
    return data


def _write_record(out: Path, package: str, finished: Mapping[str, Mapping[str, Any]]) -> None:
    write_json_atomic(out / MARKER, {"note": MARKER_NOTE, "package_sha256": package, "notebooks": dict(finished)},
                      indent=1)


def reusable_notebooks(out: Path, notebooks: Sequence[Path], package: str) -> dict[str, dict[str, Any]]:
    """Record entries of the ``notebooks`` whose earlier run in ``out`` can be kept as it is.

    An entry is kept when the notebook finished, its source and the package sources hash as they did
    then, and its saved executed copy and every file it wrote are still there (the copy unchanged).
    """
    record_ = read_record(out)
    if record_.get("package_sha256") != package:
        return {}
    kept = {}
    for path in notebooks:
        entry = record_["notebooks"].get(path.name)
        if not isinstance(entry, dict) or not isinstance(entry.get("outputs"), list):
            continue
        saved = out / "notebooks" / path.name
        outputs_there = all(isinstance(f, str) and (out / f).is_file() for f in entry["outputs"])
        if (entry.get("source_sha256") == sha256_file(path) and saved.is_file() and outputs_there
                and entry.get("executed_sha256") == sha256_file(saved)):
            kept[path.name] = entry
    return kept


def start_report_dir(out: Path, keep: Collection[str] = (), package: str = "") -> None:
    """Make ``out`` hold a fresh results set: remove what an earlier :func:`run_suite` wrote there, nothing else.

    Files named in ``keep`` (paths relative to ``out``: the saved copies and outputs of notebooks a
    resumed run reuses) stay. Entries of :data:`OWNED` that no run wrote (no :data:`MARKER`) are
    refused, naming them: they may be someone's own files. Other files in ``out`` (a sweep table,
    say) stay as they are.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder; choose a folder for the reports")
    present = [name for name in OWNED if (out / name).exists() or (out / name).is_symlink()]
    if present and not (out / MARKER).is_file():
        raise ValueError(f"{out} holds {', '.join(present)} that revlens reproduce did not write; refusing to "
                         "replace them: move them away or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    kept = {Path(name) for name in keep}
    finished = {k: v for k, v in read_record(out)["notebooks"].items() if Path("notebooks", k) in kept}
    _write_record(out, package, finished)
    for name in present:
        _remove_except(out / name, Path(name), kept)


def _remove_except(path: Path, rel: Path, kept: Collection[Path]) -> None:
    """Remove ``path`` (a file or a folder, ``rel`` relative to the report folder) except the ``kept`` files in it."""
    if path.is_dir() and not path.is_symlink():
        if not any(rel in k.parents for k in kept):
            shutil.rmtree(path)
            return
        for child in path.iterdir():
            _remove_except(child, rel / child.name, kept)
    elif rel not in kept:
        path.unlink()


def _output_state(out: Path) -> dict[str, tuple[int, int]]:
    """(mtime, size) of every file under ``figures`` and ``results``, by path relative to ``out``."""
    state = {}
    for folder in ("figures", "results"):
        for path in (out / folder).rglob("*"):
            if path.is_file():
                info = path.stat()
                state[path.relative_to(out).as_posix()] = (info.st_mtime_ns, info.st_size)
    return state


def _write_notebook(nb: Any, path: Path) -> None:
    """``nbformat.write`` (same bytes) without per-cell execution timestamps, atomically.

    nbclient stores when each cell ran in ``metadata.execution``; those times change on every run
    and are noise in a saved or committed notebook.
    """
    import nbformat

    for cell in nb.cells:
        cell.get("metadata", {}).pop("execution", None)
    text = nbformat.writes(nb)
    write_text_atomic(path, text if text.endswith("\n") else text + "\n")


@dataclass(frozen=True)
class ProgressState:
    """What :class:`TrainingProgress` shows after a progress line: models done of those seen so far, and the
    current run (``rate`` in steps per second and ``eta`` in seconds are None until two of its lines came)."""

    done: int
    seen: int
    cached: int
    setting: str
    step: int
    steps: int
    rate: float | None
    eta: float | None

    def describe(self) -> str:
        """The current run, as the bar's postfix shows it: setting, steps, steps/s and its ETA."""
        if self.step >= self.steps:
            return f"{self.setting} done"
        speed = "? steps/s, ETA ?" if self.rate is None else (
            f"{self.rate:.1f} steps/s, ETA {tqdm.format_interval(self.eta or 0.0)}")
        return f"{self.setting} step {self.step}/{self.steps}, {speed}"


class TrainingProgress:
    """Follows a progress file in a background thread and draws one tqdm bar on stderr for the training in it.

    The file holds the JSON lines of :class:`revlens.training.StepProgress` (any number of runs,
    from any number of processes). The bar counts models done of the models seen so far (a run
    loaded from the cache is done at once) and names the current run's setting, steps/s and ETA.
    It appears with the first line and is removed on :meth:`stop`, which also prints a one-line
    summary (via ``tqdm.write``) when there was any training. ``on_state`` is called with each
    :class:`ProgressState`, in the reading thread. A line that is not such an object is skipped.
    """

    def __init__(self, path: Path, desc: str, on_state: Callable[[ProgressState], None] | None = None,
                 poll: float = 0.25) -> None:
        self.path, self.desc, self.on_state, self.poll = path, desc, on_state, poll
        self._runs: dict[str, dict[str, Any]] = {}
        self._first: dict[str, tuple[int, float]] = {}  # step and time of each run's first line
        self._offset, self._partial = 0, b""
        self._current: tuple[str, int, int, float | None] = ("", 0, 0, None)  # run, step, steps, steps/s
        self._bar: tqdm | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="revlens-training-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Read what is left, remove the bar and print the summary line."""
        self._stopping.set()
        self._thread.join()

    def _follow(self) -> None:
        while not self._stopping.wait(self.poll):
            self._read()
        self._read()
        if self._bar is not None:
            self._bar.close()
            state = self._state()
            tqdm.write(f"{self.desc}: {state.done} of {state.seen} models done "
                       f"({state.done - state.cached} trained, {state.cached} from the run cache)")

    def _read(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for line in lines:
            self._apply(line)

    def _apply(self, line: bytes) -> None:
        try:
            record = json.loads(line)
            run, step, steps, when = str(record["run"]), int(record["step"]), int(record["steps"]), float(record["time"])
            record["models"] = int(record["models"])
        except (ValueError, TypeError, KeyError):
            return
        self._runs[run] = record
        first_step, first_time = self._first.setdefault(run, (step, when))
        self._current = (run, step, steps, (step - first_step) / (when - first_time) if when > first_time else None)
        state = self._state()
        self._draw(state)
        if self.on_state is not None:
            self.on_state(state)

    def _state(self) -> ProgressState:
        run, step, steps, rate = self._current
        rate = rate or None  # no steps between its first and latest line: no speed yet
        done = [r for r in self._runs.values() if r.get("done") is True]
        return ProgressState(done=sum(r["models"] for r in done), seen=sum(r["models"] for r in self._runs.values()),
                             cached=sum(r["models"] for r in done if r.get("cached") is True),
                             setting=str(self._runs[run].get("setting")), step=step, steps=steps,
                             rate=rate, eta=(steps - step) / rate if rate else None)

    def _draw(self, state: ProgressState) -> None:
        if self._bar is None:
            self._bar = tqdm(desc=self.desc, total=state.seen, initial=state.done, postfix=state.describe(),
                             leave=False, bar_format="{desc}: {n}/{total} models [{elapsed}{postfix}]")
        else:
            self._bar.total, self._bar.n = state.seen, state.done
            self._bar.set_postfix_str(state.describe())


@contextmanager
def training_progress(desc: str, on_state: Callable[[ProgressState], None] | None = None) -> Iterator[Path]:
    """Within the block, ``$REVLENS_PROGRESS_FILE`` names a fresh temporary file that a :class:`TrainingProgress`
    follows; kernels started in the block inherit it. Yields the file; afterwards the variable is as before."""
    previous = os.environ.get(PROGRESS_ENV)
    with tempfile.TemporaryDirectory(prefix="revlens-progress-") as folder:
        path = Path(folder) / "progress.jsonl"
        path.touch()
        reader = TrainingProgress(path, desc, on_state)
        os.environ[PROGRESS_ENV] = str(path)
        reader.start()
        try:
            yield path
        finally:
            reader.stop()
            if previous is None:
                os.environ.pop(PROGRESS_ENV, None)
            else:
                os.environ[PROGRESS_ENV] = previous


def run_suite(
    notebooks: Sequence[Path], out: str | Path = "reports", timeout: int | None = None, *, fresh: bool = False,
    on_progress: Callable[[str, ProgressState], None] | None = None,
) -> Path:
    """Execute each notebook in a fresh kernel (in order), saving outputs into ``out`` (a fresh results set).

    ``timeout`` is the most seconds one cell may run (None: no limit). A notebook that finished in an
    earlier run into ``out`` is not executed again when its source and the package sources are
    unchanged (see the module docstring); ``fresh`` executes every notebook regardless. A failing or
    timed-out notebook stops the run with a ValueError naming the notebook and the cell; the notebook,
    executed up to that cell, is saved under ``out/notebooks`` for inspection, and the notebooks
    finished before it are kept for the next run.

    Each notebook's training shows on stderr as one bar (:func:`training_progress`), never in its
    cell outputs; ``on_progress(notebook_name, state)`` is also called with each state of that bar.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError

    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0):
        raise ValueError(f"timeout must be a positive whole number of seconds or None (no limit), got {timeout!r}")
    out = Path(out).resolve()
    package = package_sha256()
    reused = {} if fresh else reusable_notebooks(out, notebooks, package)
    keep = [f"notebooks/{name}" for name in reused] + [f for entry in reused.values() for f in entry["outputs"]]
    start_report_dir(out, keep, package)
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    os.environ[REPORT_ENV] = str(out)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    finished: dict[str, dict[str, Any]] = dict(reused)
    timings: dict[str, str] = {}
    for path in tqdm(notebooks, desc="notebooks", unit="nb"):
        if path.name in reused:
            tqdm.write(f"{path.name}: unchanged since it finished in an earlier run into {out}; kept")
            timings[path.stem] = f"{reused[path.name].get('seconds', '?')} (an earlier run; kept)"
            continue
        start = time.perf_counter()
        source_sha = sha256_file(path)
        nb = nbformat.read(path, as_version=4)
        saved = out / "notebooks" / path.name
        before = _output_state(out)
        current = {"cell": 0}

        def on_cell_start(cell: Any, cell_index: int, current: dict[str, int] = current) -> None:
            current["cell"] = cell_index + 1  # counts every cell from 1, as the notebook shows them

        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                                on_cell_start=on_cell_start, resources={"metadata": {"path": str(path.parent)}})
        watch = None if on_progress is None else (lambda state, name=path.name: on_progress(name, state))
        try:
            with training_progress(path.stem, watch):
                client.execute()
        except CellTimeoutError:
            _write_notebook(nb, saved)
            raise ValueError(f"notebook {path} timed out in cell {current['cell']}: the cell ran longer than the "
                             f"--timeout of {timeout} s. Rerun with a larger --timeout SECONDS, or without --timeout "
                             f"for no limit; the notebooks that finished are kept and the rerun resumes at {path.name}. "
                             f"The notebook, executed up to there, is saved as {saved}") from None
        except Exception as err:  # nbclient's CellExecutionError, DeadKernelError, ...
            _write_notebook(nb, saved)
            where = f" in cell {current['cell']}" if current["cell"] else ""
            reason = f"{err.ename}: {err.evalue}" if hasattr(err, "ename") else f"{type(err).__name__}: {err}"
            raise ValueError(f"notebook {path} failed{where} ({reason}); the notebook, executed up to "
                             f"there, is saved as {saved}") from None
        _write_notebook(nb, saved)
        after = _output_state(out)
        seconds = round(time.perf_counter() - start, 1)
        finished[path.name] = {"source_sha256": source_sha, "executed_sha256": sha256_file(saved), "seconds": seconds,
                               "outputs": sorted(f for f, state in after.items() if before.get(f) != state)}
        for other in finished.values():  # a file this notebook rewrote is no longer another's
            if other is not finished[path.name]:
                other["outputs"] = [f for f in other["outputs"] if f not in finished[path.name]["outputs"]]
        _write_record(out, package, finished)
        timings[path.stem] = str(seconds)
    summary = summary_markdown(out)
    summary += "\n## Run time (s)\n\n" + "\n".join(f"- {k}: {v}" for k, v in timings.items()) + "\n"
    write_text_atomic(out / "summary.md", summary)
    return out / "summary.md"
