"""Bad input, faults and reruns on the toy side of the command line: nothing it did not write is replaced."""

import json

import pytest

from revlens.cli import main
from tests.lm_checkpoints import llada_checkpoint

TINY_TRAIN = ["train", "--steps", "2", "--n-facts", "20", "--n-control", "4", "--d-model", "16", "--heads", "2",
              "--no-progress"]


def _model_folder(path):
    llada_checkpoint(path)
    (path / "tokenizer.json").write_text("{}")
    return path


def _foreign_folder(path):
    path.mkdir()
    (path / "notes.txt").write_text("keep me")
    return path


def _json_with_config(path):  # a folder whose config.json is not a toy checkpoint's
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


REFUSED = [
    ("downloaded model folder", _model_folder, "not a revlens checkpoint; refusing to overwrite it"),
    ("folder of other files", _foreign_folder, "not a revlens checkpoint; refusing to overwrite it"),
    ("folder with someone else's config.json", _json_with_config, "not a revlens checkpoint; refusing to overwrite it"),
]


@pytest.mark.parametrize("case,make,message", REFUSED, ids=[c[0] for c in REFUSED])
def test_train_never_replaces_a_folder_it_did_not_write(tmp_path, capsys, case, make, message):
    out = make(tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(TINY_TRAIN + ["--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_train_replaces_its_own_earlier_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert main(TINY_TRAIN + ["--out", str(out), "--seed", "0"]) == 0
    assert main(TINY_TRAIN + ["--out", str(out), "--seed", "1"]) == 0
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary folder left beside it


# ---- sweep files and report names -----------------------------------------------------------------------------------

def _spec(path, **changes):
    return {**json.loads(open(path).read()), **changes}


SPEC_CASES = [
    ("ablation sweep name leaving its folder", "data/ablations_sweep.json", {"name": "../outside"}, "must be a plain name"),
    ("routing sweep name leaving its folder", "data/routing_sweep.json", {"name": "../../x"}, "must be a plain name"),
    ("routing sweep with a repeated seed", "data/routing_sweep.json", {"seeds": [0, 0]}, "'seeds' must be distinct"),
    ("routing sweep with a seed beyond torch's range", "data/routing_sweep.json", {"seeds": [2**70]},
     r"'seeds' must lie in \[0, 9223372036854775807\]"),
    ("ablation sweep with a negative seed", "data/ablations_sweep.json", {"seeds": [-1]}, "'seeds' must lie in \\[0,"),
]


@pytest.mark.parametrize("case,path,changes,message", SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_bad_sweep_files_are_refused_before_training(case, path, changes, message):
    from revlens.routing import RoutingSweepSpec
    from revlens.sweep import SweepSpec

    spec = RoutingSweepSpec if "routing" in path else SweepSpec
    with pytest.raises(ValueError, match=message):
        spec.from_dict(_spec(path, **changes))


@pytest.mark.parametrize("name", ["../figure", "a/b", "", "x y"])
def test_report_names_never_leave_the_report_folder(tmp_path, monkeypatch, name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from revlens.reports import record, save_figure

    monkeypatch.setenv("REVLENS_REPORT_DIR", str(tmp_path / "reports"))
    fig = plt.figure()
    with pytest.raises(ValueError, match="must be a plain name"):
        save_figure(fig, name)
    with pytest.raises(ValueError, match="must be a plain name"):
        record(name, {"x": 1})
    plt.close(fig)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))
