"""Training progress: a bar on stderr, or JSON lines in ``$REVLENS_PROGRESS_FILE`` that ``revlens reproduce`` shows.

Every model here trains for two steps; the one notebook (written by the test) starts a kernel in a second or two.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from revlens import reports
from revlens.experiments import SETTINGS, train_setting
from revlens.reports import ProgressState, TrainingProgress, run_suite
from revlens.stack import Member, train_stack
from revlens.training import PROGRESS_ENV, TrainConfig, train

TINY = TrainConfig("mdm", steps=2, batch_size=8, log_every=2)


def progress_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_with_a_progress_file_training_writes_lines_and_nothing_to_stderr(
        small_world, small_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    path = tmp_path / "progress.jsonl"
    monkeypatch.setenv(PROGRESS_ENV, str(path))
    train(small_cfg, small_world, TINY, seeds=(3, 4), name="tiny")
    first, *_, last = lines = progress_lines(path)
    assert {line["run"] for line in lines} == {first["run"]}
    assert first | {"time": 0} == {"run": first["run"], "setting": "tiny", "seeds": [3, 4], "models": 2, "step": 0,
                                   "steps": 2, "done": False, "cached": False, "time": 0}
    assert (last["step"], last["done"], last["cached"]) == (2, True, False)
    assert capfd.readouterr().err == ""


def test_without_a_progress_file_training_draws_its_bar_on_stderr(
        small_world, small_cfg, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    train(small_cfg, small_world, TINY, seeds=(3,))
    assert "mdm x1" in capfd.readouterr().err
    train(small_cfg, small_world, TINY, seeds=(3,), progress=False)
    assert capfd.readouterr().err == ""


def test_the_run_cache_and_the_stacked_trainer_report_too(
        small_world, small_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    path = tmp_path / "progress.jsonl"
    monkeypatch.setenv(PROGRESS_ENV, str(path))
    for _ in range(2):  # trained, then served from the cache
        train_setting(SETTINGS["MDM"], small_world, [0], TINY, cache_dir=tmp_path / "cache", instrument=False)
    trained, served = progress_lines(path)[-2:]
    assert (trained["setting"], trained["done"], trained["cached"]) == ("MDM", True, False)
    assert (served["setting"], served["step"], served["done"], served["cached"]) == ("MDM", 2, True, True)

    class World:  # train_stack's PositionedWorld over the small world's sentences
        mask_id, d_vocab = small_world.mask_id, small_world.d_vocab

        def training_data(self):
            tokens = small_world.training_sentences()
            return tokens, reports_positions(tokens)

    path.unlink()
    train_stack([Member(small_cfg, World(), 1), Member(small_cfg, World(), 2)], TINY, name="stack")
    last = progress_lines(path)[-1]
    assert (last["setting"], last["seeds"], last["models"], last["done"]) == ("stack", [1, 2], 2, True)
    assert capfd.readouterr().err == ""


def reports_positions(tokens):
    import torch

    return torch.arange(tokens.shape[1]).expand_as(tokens)


def test_the_reader_counts_models_and_times_the_current_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "progress.jsonl"
    states: list[ProgressState] = []
    base = {"setting": "MDM", "seeds": [0, 1], "models": 2, "steps": 100, "cached": False}
    lines = [{**base, "run": "a", "step": 100, "done": True, "cached": True, "time": 5.0},
             {**base, "run": "b", "step": 0, "done": False, "time": 10.0},
             {**base, "run": "b", "step": 40, "done": False, "time": 12.0}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + "not json\n" + '{"run": "b", "st')
    reader = TrainingProgress(path, "nb", states.append, poll=0.01)
    reader.start()
    reader.stop()
    assert len(states) == 3  # the bad line and the unfinished one are skipped
    assert (states[-1].done, states[-1].seen, states[-1].cached, states[-1].step) == (2, 4, 2, 40)
    assert states[-1].rate == pytest.approx(20.0) and states[-1].eta == pytest.approx(3.0)
    assert states[-1].describe() == "MDM step 40/100, 20.0 steps/s, ETA 00:03"
    assert "nb: 2 of 4 models done (0 trained, 2 from the run cache)" in capsys.readouterr().out


@pytest.fixture
def _restore_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(reports.REPORT_ENV, "")  # run_suite sets it; monkeypatch restores it after the test
    monkeypatch.delenv(PROGRESS_ENV, raising=False)


@pytest.mark.slow
def test_run_suite_shows_a_notebooks_training_and_keeps_bars_out_of_its_cells(
        tmp_path: Path, _restore_env: None, capsys: pytest.CaptureFixture) -> None:
    source = ("from pathlib import Path\n"
              "from revlens.notebook import setup\n"
              "setup()  # as every notebook does: no tqdm-without-widgets warning in the cell\n"
              "from revlens.experiments import SETTINGS, train_setting\n"
              "from revlens.training import TrainConfig\n"
              "from revlens.world import ReversalWorld\n"
              "world = ReversalWorld.generate(n_facts=12, n_control=4, seed=0)\n"
              "cfg = TrainConfig(steps=2, batch_size=8, log_every=2)\n"
              "for _ in range(2):  # trained, then served from the cache\n"
              f"    train_setting(SETTINGS['ARM'], world, [0, 1], cfg, cache_dir=Path({str(tmp_path / 'cache')!r}))\n")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source)]
    path = tmp_path / "nb" / "01_tiny.ipynb"
    path.parent.mkdir()
    nbformat.write(nb, path)
    seen: list[tuple[str, ProgressState]] = []
    run_suite([path], tmp_path / "reports", on_progress=lambda name, state: seen.append((name, state)))
    assert {name for name, _ in seen} == {"01_tiny.ipynb"}
    last = seen[-1][1]
    assert (last.done, last.seen, last.cached, last.setting) == (4, 4, 2, "ARM")
    assert "01_tiny: 4 of 4 models done (2 trained, 2 from the run cache)" in capsys.readouterr().out
    saved = nbformat.read(tmp_path / "reports" / "notebooks" / path.name, as_version=4)
    assert saved.cells[0].outputs == []  # no bar (nor anything else) in the cell
    assert PROGRESS_ENV not in __import__("os").environ
