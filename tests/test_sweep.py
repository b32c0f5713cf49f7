"""A sweep resume never passes off stale or damaged rows, and a killed sweep leaves no workers behind."""

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from revlens import sweep
from revlens.sweep import SweepSpec, SweepWarning, read_rows, run_sweep
from tests.sweeps import TINY


def spec_with(**train) -> SweepSpec:
    data = copy.deepcopy(TINY)
    data["train"].update(train)
    return SweepSpec.from_dict(data)


@pytest.fixture()
def table(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("REVLENS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "table.jsonl"
    run_sweep(spec_with(), out, progress=False)
    return out


def test_rows_carry_their_provenance(table):
    spec = spec_with()
    rows = read_rows(table)
    assert [r["provenance"] for r in rows] == [spec.provenance(s) for s, _ in spec.settings for _ in spec.seeds]
    assert spec.provenance(spec.settings[0][0]) != spec_with(steps=5).provenance(spec.settings[0][0])
    assert spec.provenance(spec.settings[0][0]) != spec.provenance(spec.settings[1][0])


def test_resume_with_a_changed_spec_refuses_then_redoes_the_stale_rows(table):
    before = read_rows(table)
    changed = spec_with(steps=5)
    with pytest.raises(ValueError, match=r"4 row\(s\) do not match.*MDM seeds \[0, 1\]: produced by a different"):
        run_sweep(changed, table, progress=False)
    assert read_rows(table) == before  # refusing touches nothing
    with pytest.warns(SweepWarning, match="dropping 4 row"):
        run_sweep(changed, table, progress=False, redo=True)
    fresh = table.with_name("fresh.jsonl")
    run_sweep(changed, fresh, progress=False)
    assert read_rows(table) == read_rows(fresh) != before


def test_rows_of_another_library_version_are_refused(table, monkeypatch):
    monkeypatch.setattr(sweep, "code_fingerprint", lambda: "0123456789abcdef")
    with pytest.raises(ValueError, match=r"different revlens version \(\w+, this is 0123456789abcdef\)"):
        run_sweep(spec_with(), table, progress=False)


def test_rows_without_provenance_are_unknown_and_refused_but_readable(table):
    rows = read_rows(table)
    old = [{k: v for k, v in r.items() if k != "provenance"} for r in rows]
    table.write_text("".join(json.dumps(r) + "\n" for r in old))
    assert read_rows(table) == old  # notebooks read tables written before provenance
    with pytest.raises(ValueError, match=r"MDM seeds \[0, 1\]: unknown provenance"):
        run_sweep(spec_with(), table, progress=False)
    with pytest.warns(SweepWarning):
        run_sweep(spec_with(), table, progress=False, redo=True)
    assert read_rows(table) == rows


def test_a_torn_last_line_is_dropped_with_a_warning_naming_file_and_line(table):
    rows = read_rows(table)
    text = table.read_text()
    table.write_text(text[: len(text) - 40])  # a crash in the middle of the 4th row
    with pytest.warns(SweepWarning, match=rf"{table.name}, line 4: incomplete last row dropped"):
        assert read_rows(table) == rows[:3]
    with pytest.warns(SweepWarning, match="line 4"):
        run_sweep(spec_with(), table, progress=False)
    assert read_rows(table) == rows
    assert table.read_text() == text


def test_a_damaged_middle_line_is_an_error_naming_file_and_line(table):
    lines = table.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:50] + "\n"
    table.write_text("".join(lines))
    with pytest.raises(ValueError, match=rf"{table.name}, line 2: not a JSON row"):
        run_sweep(spec_with(), table, progress=False)


def test_rows_are_written_by_atomic_replacement(table, monkeypatch):
    """A failure while writing leaves the previous table intact (nothing appended in place)."""
    before = table.read_text()
    table.write_text("".join(before.splitlines(keepends=True)[:2]))  # ARM still to do
    partial = table.read_text()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        run_sweep(spec_with(), table, progress=False)
    assert table.read_text() == partial


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")
@pytest.mark.slow
def test_killing_the_sweep_parent_ends_its_workers(tmp_path):
    data = copy.deepcopy(TINY)
    data["train"].update(steps=1_000_000, log_every=1_000_000)  # workers would train for hours
    (tmp_path / "spec.json").write_text(json.dumps(data))
    env = {**os.environ, "REVLENS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).parents[1])}
    parent = subprocess.Popen([sys.executable, "-m", "revlens.cli", "sweep", str(tmp_path / "spec.json"),
                               "--out", str(tmp_path / "t.jsonl"), "--jobs", "2"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(_children(parent.pid)) < 3 and time.monotonic() < deadline:  # two workers + resource tracker
            time.sleep(0.2)
        children = _children(parent.pid)
        assert len(children) >= 3, "the sweep did not start its workers"
        time.sleep(1.0)  # let the workers start training
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 60  # a worker still importing torch exits once it has (seconds, more under load)
        while any(map(_alive, children)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [c for c in children if _alive(c)], "workers outlived the killed sweep"
    finally:
        parent.kill()
        for child in children:  # only on failure: the processes this test started
            if _alive(child):
                os.kill(child, signal.SIGKILL)
