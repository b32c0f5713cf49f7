"""Pre-registered flips: the shipped flip sweep and prediction files are what the library writes from the
routing sweep's core recipe and geometry alone, every flip reverses the default verdict, the sweep engine
accepts the flip sweep, and the checker judges trained rows by the rule the file states."""

import json
from pathlib import Path

import pytest

from revlens.routing import (N_CTX, RoutingSweepSpec, distractor_offsets, matched_filter_reverse_accuracy,
                             matched_filter_score, run_routing_sweep)
from revlens.routing_flips import (DIRECTIONS, MARGIN_TOL, PREDICTIONS_FILE, RULE, SWEEP_FILE, Flip, check_flips,
                                   flip_files, flip_layout, layout_verdict, read_predictions, select_flips,
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

    for owner, name in [(revlens.stack, "train_stack"), (revlens.model.HookedEncoder, "__init__"),
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
