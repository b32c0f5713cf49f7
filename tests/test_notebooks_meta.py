"""Static checks on the committed notebooks (nbval itself runs them)."""

import json
from pathlib import Path

import pytest
from nbval.plugin import comment_markers

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


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
