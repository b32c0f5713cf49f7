"""Pre-registered flips: the shipped flip sweep and prediction files are what the library writes from the
routing sweep's core recipe and geometry alone, every flip reverses the default verdict, the sweep engine
accepts the flip sweep, and the checker judges trained rows by the rule the file states."""

import json
from pathlib import Path

import pytest

from revlens.routing import (N_CTX, RoutingSweepSpec, distractor_offsets, matched_filter_reverse_accuracy,
                             matched_filter_score, run_routing_sweep)
from revlens.routing_flips import (DIRECTIONS, MARGIN_TOL, PREDICTIONS_FILE, RULE, SWEEP_FILE, TABLE_FILE, Flip,
                                   check_flips, flip_files, flip_layout, flip_report, flip_scores, layout_verdict,
                                   read_predictions, registered_before, registration_commit, select_flips,
                                   write_flip_files)
from revlens.sweep import read_rows

DATA = Path(__file__).resolve().parents[1] / "data"
KEY = ("cell", "delta", "base", "seed")


def routing_sweep() -> dict:
    return json.loads((DATA / "routing_sweep.json").read_text())


def test_shipped_flip_files_are_what_the_library_writes():
    """Both files recomputed from data/routing_sweep.json: a changed core recipe, kernel or selection rule shows here."""
    sweep, predictions = flip_files(routing_sweep())
    assert json.loads(SWEEP_FILE.read_text()) == json.loads(json.dumps(sweep))
    assert read_predictions(PREDICTIONS_FILE) == json.loads(json.dumps(predictions))
    spec = RoutingSweepSpec.from_dict(sweep)
    assert [(c.name, c.distractor_offsets) for c in spec.cells] == \
        [(c["cell"], tuple(c["distractor_offsets"])) for c in predictions["cells"]]
    core = next(c for c in routing_sweep()["cells"] if c["name"] == "core")
    assert all(c.objective == core["objective"] and c.model == core["model"] and c.layout == "gaps" for c in spec.cells)
    assert spec.seeds == (0, 1, 2, 3, 4) and spec.train == RoutingSweepSpec.from_dict(routing_sweep()).train
    assert 4 <= len(spec.cells) <= 8 and {c["direction"] for c in predictions["cells"]} == set(DIRECTIONS)


def test_every_registered_flip_reverses_the_default_verdict_by_the_kernel():
    record = read_predictions(PREDICTIONS_FILE)
    assert record["rule"] == RULE and record["seeds"] == routing_sweep()["seeds"]
    for cell in record["cells"]:
        d, delta, base, offsets = cell["d_head"], cell["delta"], cell["base"], cell["distractor_offsets"]
        assert delta not in offsets and max(offsets) < N_CTX and cell["default_offsets"] == distractor_offsets(delta)
        assert cell["predicted_b_wins"] != cell["default_b_wins"]
        assert cell["predicted_share"] == (1.0 if cell["predicted_b_wins"] else 0.0)  # every pair goes one way
        assert cell["default_share"] == pytest.approx(matched_filter_reverse_accuracy(d, delta, base), abs=1e-6)
        kernel_b = matched_filter_score(d, delta, base, delta)  # K(2 delta)
        kernels = [matched_filter_score(d, delta, base, o) for o in offsets]  # K(delta + o)
        assert cell["margin"] == pytest.approx(kernel_b - max(kernels), abs=1e-6)
        lead = [(kernel_b - k) / (d / 2) * (1 if cell["predicted_b_wins"] else -1) for k in kernels]
        assert min(lead) >= MARGIN_TOL - 1e-9  # each offset goes the predicted way by the tolerance
        assert (cell["margin"] > 0) == cell["predicted_b_wins"]
        if cell["direction"] == "fail->succeed":  # some default offset beats B: the flip keeps distractors off it
            assert cell["default_margin"] < 0 < cell["margin"]


def test_flip_layouts_come_from_geometry_alone(monkeypatch):
    """No model is built, trained or evaluated while flips are selected."""
    import revlens.evaluation
    import revlens.model
    import revlens.stack

    def refuse(*args, **kwargs):
        raise AssertionError("flip selection touched a model")

    for owner, name in [(revlens.stack, "train_stack"), (revlens.model.ToyTransformer, "__init__"),
                        (revlens.evaluation, "evaluate")]:
        monkeypatch.setattr(owner, name, refuse)
    flips = select_flips(16, [1, 2, 3, 4, 6, 8, 12, 16, 24, 32], [100.0, 1e4, 1e6])
    assert flips == select_flips(16, [1, 2, 3, 4, 6, 8, 12, 16, 24, 32], [100.0, 1e4, 1e6])  # deterministic
    # delta 2 fails today (K(6) > K(4)); no default offset loses to B clearly, so the nearest that do beyond 5
    assert flip_layout(16, 2, 1e4) == Flip("fail->succeed", 2, 1e4, 16, (6, 7))
    assert flip_layout(16, 3, 1e4) is None  # succeeds today, but no offset in the context beats B
    assert flip_layout(16, 6, 1e4) is None  # matched filter 0.42: no clear verdict to flip
    v = layout_verdict(16, 2, 1e4, [6, 7])
    assert v["b_wins"] and v["share"] == 1.0 and v["nearest_key_share"] == 1.0 and v["pair_margin_min"] == v["margin"] > 0


@pytest.mark.slow
def test_the_engine_accepts_the_flip_sweep_and_its_rows_name_their_layout(tmp_path):
    data = json.loads(SWEEP_FILE.read_text())
    data.update(seeds=[0], train={"steps": 2, "batch_size": 8})
    data["cells"] = data["cells"][:1] + data["cells"][-1:]
    config = tmp_path / "flips.json"
    config.write_text(json.dumps(data))
    from revlens.cli import main

    assert main(["sweep", str(config), "--out", str(tmp_path / "flips.jsonl")]) == 0
    rows = read_rows(tmp_path / "flips.jsonl", KEY)
    assert [(r["cell"], r["distractor_offsets"]) for r in rows] == [(c["name"], c["distractor_offsets"]) for c in data["cells"]]
    spec = RoutingSweepSpec.from_dict(data)
    for cell in spec.cells:
        world = spec.world_for(cell.deltas[0], 0, cell.layout, cell.distractor_offsets)
        tokens, positions = world.training_data()
        assert set(positions[:, 2:].unique().tolist()) == set(cell.distractor_offsets)
    run_routing_sweep(spec, tmp_path / "flips.jsonl", progress=False)  # a resume: nothing stale, nothing retrained
    assert read_rows(tmp_path / "flips.jsonl", KEY) == rows


def _rows(record: dict, reverse: dict, inplace: float = 1.0) -> list[dict]:
    return [{"cell": c["cell"], "delta": c["delta"], "base": c["base"], "seed": s, "distractor_offsets": c["distractor_offsets"],
             "reverse_acc": reverse[c["cell"]], "inplace_acc": inplace} for c in record["cells"] for s in record["seeds"]]


def test_checker_judges_each_cell_by_the_registered_rule():
    record = read_predictions(PREDICTIONS_FILE)
    as_predicted = {c["cell"]: 0.9 if c["predicted_b_wins"] else 0.05 for c in record["cells"]}
    table = check_flips(record, _rows(record, as_predicted))
    assert (table.status == "hit").all() and (table.seeds == len(record["seeds"])).all()
    as_default = {c["cell"]: 0.9 if c["default_b_wins"] else 0.05 for c in record["cells"]}
    assert (check_flips(record, _rows(record, as_default)).status == "miss").all()
    at_guess = check_flips(record, _rows(record, {c["cell"]: 1 / 3 for c in record["cells"]}))  # a third: not B
    assert list(at_guess.status) == ["miss" if c["predicted_b_wins"] else "hit" for c in record["cells"]]
    assert (check_flips(record, _rows(record, as_predicted, inplace=0.5)).status == "void").all()
    with pytest.raises(ValueError, match="no rows for seeds \\[4\\]"):
        check_flips(record, [r for r in _rows(record, as_predicted) if r["seed"] != 4])
    wrong = _rows(record, as_predicted)
    wrong[0]["distractor_offsets"] = distractor_offsets(wrong[0]["delta"])
    with pytest.raises(ValueError, match="other distractor offsets"):
        check_flips(record, wrong)


def test_flips_are_registered_once_and_a_file_with_another_rule_is_refused(tmp_path):
    sweep, predictions = tmp_path / "s.json", tmp_path / "p.json"
    write_flip_files(sweep, predictions)
    assert json.loads(predictions.read_text()) == json.loads(PREDICTIONS_FILE.read_text())
    with pytest.raises(FileExistsError, match="registered already"):
        write_flip_files(sweep, tmp_path / "q.json")
    record = json.loads(predictions.read_text())
    record["rule"]["b_wins_above"] = 1 / 3
    predictions.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="'rule'"):
        read_predictions(predictions)


def test_the_shipped_flip_table_covers_its_sweep_file_and_judges_as_shipped():
    """data/routing_flips.jsonl: one row per planned model of data/routing_flips_sweep.json, each with the config
    hash the sweep file gives it, every seed; judged by the registered rule it gives the statuses it shipped with."""
    spec = RoutingSweepSpec.from_dict(json.loads(SWEEP_FILE.read_text()))
    rows = read_rows(TABLE_FILE, KEY)
    assert [(tuple(r[k] for k in KEY), r["provenance"]["config"], r["group"]) for r in rows] == \
        [(p.key, p.config, p.labels["group"]) for p in spec.planned()]
    record = read_predictions(PREDICTIONS_FILE)
    assert {(r["cell"], r["seed"]) for r in rows} == {(c["cell"], s) for c in record["cells"] for s in record["seeds"]}
    table = check_flips(record, rows)
    assert list(table.status) == ["hit"] * 6 and (table.seeds == 5).all() and (table.inplace_acc == 1.0).all()
    assert list(table.measured_b_wins) == [c["predicted_b_wins"] for c in record["cells"]]
    report = flip_report(record, rows, read_rows(DATA / "routing.jsonl", KEY))
    assert list(report.nearest_key_status) == ["hit", "miss", "hit", "hit", "hit", "miss"]
    assert flip_scores(report) == {"cells": 6, "hits": 6, "nearest_key_hits": 4, "disagree": 2, "hits_where_disagree": 2,
                                   "nearest_key_hits_where_disagree": 0, "layout_flips": 6, "layout_blind_best": 6,
                                   "filter_both": 12, "nearest_key_both": 8}


def test_flip_report_sets_each_cell_beside_its_default_layout():
    record = read_predictions(PREDICTIONS_FILE)
    as_predicted = {c["cell"]: 0.9 if c["predicted_b_wins"] else 0.05 for c in record["cells"]}
    default = [{"cell": "core", "delta": c["delta"], "base": c["base"], "seed": s, "reverse_acc": 0.9 if c["default_b_wins"] else 0.0}
               for c in record["cells"] for s in record["seeds"]]
    report = flip_report(record, _rows(record, as_predicted), default)
    assert (report.status == "hit").all() and (report.default_measured_b_wins == report.default_b_wins).all()
    assert list(report.offsets) == [c["distractor_offsets"] for c in record["cells"]]
    assert (report.pair_margin_norm >= MARGIN_TOL - 1e-9).all()
    scores = flip_scores(report)
    assert scores["hits"] == scores["layout_flips"] == 6 and scores["filter_both"] == 12 and scores["layout_blind_best"] == 6
    unchanged = flip_report(record, _rows(record, {c["cell"]: 0.9 if c["default_b_wins"] else 0.0 for c in record["cells"]}),
                            default)
    assert flip_scores(unchanged)["layout_flips"] == 0 and flip_scores(unchanged)["hits"] == 0  # no flip: every cell a miss
    with pytest.raises(ValueError, match="no core row"):
        flip_report(record, _rows(record, as_predicted), default[5:])


def test_registration_commit_names_the_commit_that_added_a_file(tmp_path):
    import subprocess

    assert registration_commit(tmp_path / "x.json").startswith("unknown (not a git checkout")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "start"], cwd=tmp_path, check=True)
    (tmp_path / "p.json").write_text("{}")
    assert registration_commit(tmp_path / "p.json") == "unknown (the file is not committed)"
    assert registered_before(tmp_path / "p.json", tmp_path / "t.jsonl") is None
    for name in ("p.json", "t.jsonl"):
        (tmp_path / name).write_text("{}")
        subprocess.run(["git", "add", name], cwd=tmp_path, check=True)
        subprocess.run([*git, "commit", "-q", "-m", name], cwd=tmp_path, check=True)
    head = lambda ref: subprocess.run(["git", "rev-parse", ref], cwd=tmp_path, capture_output=True, text=True).stdout.strip()  # noqa: E731
    assert registration_commit(tmp_path / "p.json").split()[0] == head("HEAD~1")
    assert registration_commit(tmp_path / "t.jsonl").split()[0] == head("HEAD")
    assert registered_before(tmp_path / "p.json", tmp_path / "t.jsonl") is True
    assert registered_before(tmp_path / "t.jsonl", tmp_path / "p.json") is False
    assert registered_before(tmp_path / "p.json", tmp_path / "p.json") is False  # not strictly before
