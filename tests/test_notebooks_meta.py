"""Static checks on the committed notebooks (nbval itself runs them)."""

import json
import re
from pathlib import Path

import pytest
from nbval.plugin import comment_markers

ROOT = Path(__file__).parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def code_cells(path):
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def test_there_are_numbered_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(1, len(NOTEBOOKS) + 1)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_nbval_markers_are_exact_and_used_sparingly(path):
    """A marker with extra text on its line is silently ignored by nbval; catch it here."""
    ignored = 0
    for cell in code_cells(path):
        for line in "".join(cell["source"]).splitlines():
            stripped = line.strip().lstrip("#").strip()
            if line.strip().startswith("#") and stripped.startswith("NBVAL"):
                assert stripped in comment_markers, f"{path.name}: unrecognised nbval marker {line!r}"
                ignored += stripped == "NBVAL_IGNORE_OUTPUT"
    assert ignored <= 2, f"{path.name} ignores the output of {ignored} cells"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_committed_with_outputs_and_in_order(path):
    cells = code_cells(path)
    counts = [c["execution_count"] for c in cells]
    assert all(isinstance(n, int) for n in counts), f"{path.name} has unexecuted cells"
    assert counts == sorted(counts)
    assert not any(o.get("output_type") == "error" for c in cells for o in c["outputs"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_progress_frames_or_warnings_are_committed(path):
    stderr = [o for c in code_cells(path) for o in c["outputs"] if o.get("name") == "stderr"]
    assert not stderr, f"{path.name} commits {len(stderr)} stderr outputs (run python -m revlens.notebook {path.name})"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_kernelspec_is_the_one_a_fresh_install_writes(path):
    """JupyterLab rewrites a notebook whose kernelspec differs from the installed one on open."""
    from jupyter_client.kernelspec import KernelSpecManager

    installed = KernelSpecManager().get_kernel_spec("python3")
    committed = json.loads(path.read_text())["metadata"]["kernelspec"]
    assert committed["name"] == "python3"
    assert committed["display_name"] == installed.display_name


EXTERNAL_REFERENCES = re.compile(
    r"SCIENCE|ECOSYSTEM|DEVELOPERS\.md|\.\./shared|\bshared/|\bcalibration\b|\bsessions?\b|\bthe [a-z]+ issue\b",
    re.IGNORECASE,
)


@pytest.mark.parametrize("path", [*NOTEBOOKS, ROOT / "README.md", ROOT / "data" / "README.md"], ids=lambda p: p.name)
def test_text_cites_nothing_outside_the_repository(path):
    """Notebooks and READMEs speak to a reader who has only this repository and public sources."""
    text = path.read_text() if path.suffix == ".md" else "\n".join(
        "".join(c["source"]) for c in json.loads(path.read_text())["cells"]
    )
    hits = sorted({m.group(0) for m in EXTERNAL_REFERENCES.finditer(text)})
    assert not hits, f"{path.name} refers to documents or processes outside the repository: {hits}"


MAX_LINE = 120
"""Widest committed output line: what a JupyterLab output area shows beside the file browser without wrapping."""


def text_outputs(path):
    """(cell number counting every cell from 1, kind, text) of each stdout stream and text/plain output."""
    for i, cell in enumerate(json.loads(path.read_text())["cells"], 1):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stdout":
                yield i, "stdout", "".join(output["text"])
            elif "text/plain" in output.get("data", {}):
                yield i, "text/plain", "".join(output["data"]["text/plain"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_text_outputs_fit_a_120_character_output_area(path):
    """A wide table or message wraps or scrolls sideways in JupyterLab; render tables as DataFrames instead."""
    wide = [f"cell {i} ({kind}): {len(line)} characters: {line[:60]!r}..."
            for i, kind, text in text_outputs(path) for line in text.splitlines() if len(line) > MAX_LINE]
    assert not wide, f"{path.name} commits output lines over {MAX_LINE} characters:\n" + "\n".join(wide)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_execution_timestamps_are_committed(path):
    """nbclient writes when each cell ran into metadata.execution; it changes on every run (strip it with
    python -m revlens.notebook NOTEBOOK.ipynb)."""
    stamped = [i for i, c in enumerate(json.loads(path.read_text())["cells"], 1) if "execution" in c.get("metadata", {})]
    assert not stamped, f"{path.name} commits execution timestamps in cells {stamped}"
