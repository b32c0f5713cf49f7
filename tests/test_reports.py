"""``revlens reproduce`` (:func:`revlens.reports.run_suite`): cell timeout, resuming a stopped run, clean saved notebooks.

Every notebook here is written by the test and runs in a second or two (a kernel start dominates).
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from revlens import reports
from revlens.cli import build_parser, main
from revlens.reports import MARKER, run_suite


@pytest.fixture(autouse=True)
def _restore_report_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(reports.REPORT_ENV, "")  # run_suite sets it; monkeypatch restores it after the test


def write_notebook(folder: Path, name: str, *sources: str) -> Path:
    """A notebook of one markdown cell and the given code cells."""
    folder.mkdir(parents=True, exist_ok=True)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("a notebook")] + [nbformat.v4.new_code_cell(s) for s in sources]
    path = folder / name
    nbformat.write(nb, path)
    return path


def logging_notebook(folder: Path, name: str, log: Path, *more: str, record: bool = True) -> Path:
    """A notebook that appends its name to ``log`` each time it runs and (with ``record``) records one number."""
    stem = Path(name).stem
    recording = [f"from revlens.reports import record\nrecord({stem!r}, {{'x': 1}})"] if record else []
    return write_notebook(folder, name, f"with open({str(log)!r}, 'a') as f:\n    f.write({stem!r} + '\\n')",
                          *recording, *more)


def runs_logged(log: Path) -> list[str]:
    return log.read_text().split() if log.is_file() else []


@pytest.mark.slow
def test_a_rerun_keeps_finished_notebooks_and_executes_only_what_changed(tmp_path: Path) -> None:
    nb_dir, out, log = tmp_path / "nb", tmp_path / "reports", tmp_path / "ran.txt"
    first = logging_notebook(nb_dir, "01_first.ipynb", log, "print(1)")
    second = logging_notebook(nb_dir, "02_second.ipynb", log, "print(2)")
    run_suite([first, second], out)
    assert runs_logged(log) == ["01_first", "02_second"]
    saved_first = (out / "notebooks" / "01_first.ipynb").read_bytes()

    summary = run_suite([first, second], out)
    assert runs_logged(log) == ["01_first", "02_second"], "an unchanged finished notebook was executed again"
    assert (out / "notebooks" / "01_first.ipynb").read_bytes() == saved_first
    assert sorted(p.name for p in (out / "results").iterdir()) == ["01_first.json", "02_second.json"]
    assert "01_first: " in summary.read_text() and "(an earlier run; kept)" in summary.read_text()

    logging_notebook(nb_dir, "02_second.ipynb", log, "print(22)")  # a changed source runs again
    run_suite([first, second], out)
    assert runs_logged(log) == ["01_first", "02_second", "02_second"]
    outputs = nbformat.read(out / "notebooks" / "02_second.ipynb", as_version=4).cells[3].outputs
    assert outputs[0].text == "22\n"

    run_suite([first, second], out, fresh=True)  # --fresh executes everything
    assert runs_logged(log) == ["01_first", "02_second", "02_second", "01_first", "02_second"]


@pytest.mark.slow
def test_other_package_sources_or_a_changed_saved_copy_mean_a_fresh_run(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    nb_dir, out, log = tmp_path / "nb", tmp_path / "reports", tmp_path / "ran.txt"
    first = logging_notebook(nb_dir, "01_first.ipynb", log)
    run_suite([first], out)
    (out / "notebooks" / "01_first.ipynb").write_text((out / "notebooks" / "01_first.ipynb").read_text() + " ")
    run_suite([first], out)
    assert runs_logged(log) == ["01_first", "01_first"]

    monkeypatch.setattr(reports, "package_sha256", lambda: "0" * 64)  # as if revlens had been edited
    run_suite([first], out)
    assert runs_logged(log) == ["01_first"] * 3
    assert json.loads((out / MARKER).read_text())["package_sha256"] == "0" * 64


@pytest.mark.slow
def test_a_notebook_not_in_this_run_leaves_nothing_behind(tmp_path: Path) -> None:
    nb_dir, out, log = tmp_path / "nb", tmp_path / "reports", tmp_path / "ran.txt"
    first = logging_notebook(nb_dir, "01_first.ipynb", log)
    second = logging_notebook(nb_dir, "02_second.ipynb", log)
    run_suite([first, second], out)
    run_suite([second], out)
    assert runs_logged(log) == ["01_first", "02_second"]
    assert sorted(p.name for p in (out / "results").iterdir()) == ["02_second.json"]
    assert sorted(p.name for p in (out / "notebooks").iterdir()) == ["02_second.ipynb"]
    assert list(json.loads((out / MARKER).read_text())["notebooks"]) == ["02_second.ipynb"]


@pytest.mark.slow
def test_a_timeout_names_notebook_and_cell_and_the_rerun_resumes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    nb_dir, out, log = tmp_path / "nb", tmp_path / "reports", tmp_path / "ran.txt"
    logging_notebook(nb_dir, "01_quick.ipynb", log, record=False)  # no imports: quick even on a busy machine
    write_notebook(nb_dir, "02_slow.ipynb", "x = 1", "import time\ntime.sleep(600)", "y = 2")
    args = ["reproduce", "--notebooks", str(nb_dir), "--out", str(out)]
    assert main([*args, "--timeout", "8"]) == 2
    err = capsys.readouterr().err
    assert f"notebook {nb_dir / '02_slow.ipynb'} timed out in cell 3" in err
    assert "--timeout of 8 s" in err and "Rerun with a larger --timeout SECONDS" in err
    cells = nbformat.read(out / "notebooks" / "02_slow.ipynb", as_version=4).cells
    assert cells[1].execution_count == 1 and cells[3].execution_count is None

    write_notebook(nb_dir, "02_slow.ipynb", "x = 1", "print(2)", "y = 2")  # now quick enough
    assert main(args) == 0
    assert runs_logged(log) == ["01_quick"], "the notebook that finished before the timeout ran again"
    assert sorted(p.name for p in (out / "notebooks").iterdir()) == ["01_quick.ipynb", "02_slow.ipynb"]


def test_saved_notebooks_carry_no_execution_timestamps(tmp_path: Path) -> None:
    path = write_notebook(tmp_path / "nb", "01_print.ipynb", "print(1)", "1 + 1")
    out = tmp_path / "reports"
    run_suite([path], out)
    cells = nbformat.read(out / "notebooks" / "01_print.ipynb", as_version=4).cells
    assert [c.outputs[0].get("text") for c in cells[1:2]] == ["1\n"]
    assert not [i for i, c in enumerate(cells, 1) if "execution" in c.metadata]


@pytest.mark.parametrize("value", ["0", "-5", "1.5", "nan", "inf", "soon"])
def test_reproduce_refuses_a_timeout_that_is_not_a_positive_whole_number(value: str,
                                                                         capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["reproduce", "--timeout", value])
    assert exit_.value.code == 2
    assert f"argument --timeout: must be an integer > 0, got {value!r}" in capsys.readouterr().err


def test_reproduce_has_no_cell_timeout_unless_asked() -> None:
    assert build_parser().parse_args(["reproduce"]).timeout is None
    assert build_parser().parse_args(["reproduce", "--timeout", "7200"]).timeout == 7200


def test_run_suite_refuses_a_timeout_of_the_wrong_kind(tmp_path: Path) -> None:
    path = write_notebook(tmp_path / "nb", "01_print.ipynb", "print(1)")
    with pytest.raises(ValueError, match="timeout must be a positive whole number of seconds or None"):
        run_suite([path], tmp_path / "reports", timeout=0)
    assert not (tmp_path / "reports").exists()
