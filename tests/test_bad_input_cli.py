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


# ---- toy world files and --out, checked before any training ---------------------------------------------------------

def _world(**changes):
    from revlens.world import ReversalWorld

    return {**ReversalWorld.generate(10, 3, 0).to_dict(), **changes}


def _facts(edit):
    data = _world()
    return {**data, "facts": edit(data["facts"])}


WORLD_CASES = [
    ("world without facts", {k: v for k, v in _world().items() if k != "facts"}, "lacks the field(s) 'facts'"),
    ("world with a string n_facts", _world(n_facts="10"), "n_facts='10'"),
    ("world with a bool n_control", _world(n_control=True), "n_control=True"),
    ("world with a null seed", _world(seed=None), "'seed' must be an integer"),
    ("world with facts that are not pairs", _world(facts=[["A1"]] * 10), "'facts' must be a list of [A, B] pairs"),
    ("world that is a list", [1, 2], "a world must be a JSON object"),
    ("world with a duplicated A entity", _facts(lambda f: [f[0]] + f[:-1]), "repeat the A entity"),
    ("world with a duplicated B entity", _facts(lambda f: [[f[0][0], f[1][1]], *f[1:]]), "repeat the B entity"),
    ("world with swapped alphabets", _facts(lambda f: [[b, a] for a, b in f]), "is not an A entity"),
    ("world with a B entity on the A side", _facts(lambda f: [[f[0][1], f[0][1]], *f[1:]]), "is not an A entity"),
    ("world with an unknown entity", _facts(lambda f: [["A99", f[0][1]], *f[1:]]), "outside its vocabulary: 'A99'"),
]


@pytest.fixture
def no_training(monkeypatch):
    """Training fails the test: the refusals below must come before any training time is spent."""
    from revlens import training

    def train(*args, **kwargs):
        raise AssertionError("trained before checking its input")

    monkeypatch.setattr(training, "train", train)


@pytest.mark.parametrize("case,data,message", WORLD_CASES, ids=[c[0] for c in WORLD_CASES])
def test_malformed_world_files_are_refused_naming_file_and_field(tmp_path, capsys, no_training, case, data, message):
    path = tmp_path / "world.json"
    path.write_text(json.dumps(data))
    assert main(TINY_TRAIN + ["--world", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{path}: " in err and message in err, err
    assert not (tmp_path / "run").exists()


def test_the_shipped_world_still_loads():
    from revlens.world import ReversalWorld

    world = ReversalWorld.load("data/toy_world.json")
    assert world.to_dict() == json.loads(open("data/toy_world.json").read())


def test_train_out_that_is_a_file_is_refused_before_training(tmp_path, capsys, no_training):
    out = tmp_path / "out"
    out.write_text("mine")
    assert main(TINY_TRAIN + ["--out", str(out)]) == 2
    assert f"{out} exists and is not a folder" in capsys.readouterr().err
    assert out.read_text() == "mine"


# ---- numeric options, devices and output paths: refused while the arguments are read ---------------------------------

def _arg_cases(tmp):
    folder = str(tmp)  # an existing folder where a file path belongs
    big = str(2**70)
    return [
        ("small-pair lr inf", ["small-pair", "--lr", "inf"], "--lr: must be a finite number > 0, got 'inf'"),
        ("small-pair lr nan", ["small-pair", "--lr", "nan"], "--lr: must be a finite number > 0, got 'nan'"),
        ("small-pair lr overflowing", ["small-pair", "--lr", "1e999"], "--lr: must be a finite number > 0"),
        ("train lr nan", ["train", "--lr", "nan", "--out", "x"], "--lr: must be a finite number > 0"),
        ("train lr zero", ["train", "--lr", "0", "--out", "x"], "--lr: must be a finite number > 0, got '0'"),
        ("train huge seed", ["train", "--seed", big, "--out", "x"], f"--seed: must be an integer in [0, {2**63 - 1}]"),
        ("train negative seed", ["train", "--seed", "-1", "--out", "x"], "--seed: must be an integer in [0,"),
        ("train huge world seed", ["train", "--world-seed", big, "--out", "x"], "--world-seed: must be an integer in"),
        ("small-pair huge seed", ["small-pair", "--seed", big], "--seed: must be an integer in [0,"),
        ("text-reversal huge seed", ["text-reversal", "d", "--out", "o", "--seed", big], "--seed: must be an integer"),
        ("train zero steps", ["train", "--steps", "0", "--out", "x"], "--steps: must be an integer >= 1, got '0'"),
        ("train fractional steps", ["train", "--steps", "2.5", "--out", "x"], "--steps: must be an integer >= 1"),
        ("train one fact", ["train", "--n-facts", "1", "--out", "x"], "--n-facts: must be an integer >= 2"),
        ("train zero control facts", ["train", "--n-control", "0", "--out", "x"], "--n-control: must be an integer >= 1"),
        ("sweep zero jobs", ["sweep", "s.json", "--jobs", "0"], "--jobs: must be an integer >= 1"),
        ("text-reversal zero patience", ["text-reversal", "d", "--out", "o", "--patience", "0"], "--patience: must be"),
        ("facts on cuda without a GPU", ["facts", "m", "--device", "cuda"],
         "--device: CUDA requested ('cuda') but not available on this machine; use --device cpu"),
        ("facts on an unknown device", ["facts", "m", "--device", "gpu0"], "--device: 'gpu0' is not a device name"),
        ("facts rows into a folder", ["facts", "m", "--out", folder], f"--out: {folder} is a folder"),
        ("sweep table into a folder", ["sweep", "s.json", "--out", folder], f"--out: {folder} is a folder"),
    ]


ARG_IDS = [c[0] for c in _arg_cases("/")]


@pytest.mark.parametrize("index", range(len(ARG_IDS)), ids=ARG_IDS)
def test_bad_option_values_are_refused_by_name_while_parsing(tmp_path, capsys, monkeypatch, index):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _, argv, message = _arg_cases(tmp_path)[index]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert f"argument {message}" in capsys.readouterr().err


def test_number_option_accepts_what_it_should():
    from revlens.config import MAX_SEED, number_option

    assert number_option(int, 0, MAX_SEED)(str(MAX_SEED)) == MAX_SEED
    assert number_option(float, 0, strict=True)("3e-3") == 3e-3
    assert number_option(float, 0, 1)("1") == 1.0


# ---- wrong-typed fields of the toy model and training settings ------------------------------------------------------

CONFIG_CASES = [
    ("EncoderConfig", {"d_vocab": 10, "d_model": "64"}, "d_model must be a positive integer, got '64'"),
    ("EncoderConfig", {"d_vocab": 10, "n_layers": True}, "n_layers must be a positive integer, got True"),
    ("EncoderConfig", {"d_vocab": 10, "n_heads": 4.0}, "n_heads must be a positive integer, got 4.0"),
    ("EncoderConfig", {"d_vocab": 10, "residual": "yes"}, "residual must be true or false, got 'yes'"),
    ("EncoderConfig", {"d_vocab": 10, "tie_embeddings": 1}, "tie_embeddings must be true or false, got 1"),
    ("EncoderConfig", {"d_vocab": 10, "untied_positions": "qk"}, "untied_positions must be a list of projection names"),
    ("EncoderConfig", {"d_vocab": 10, "device": 0}, "device must be a device name"),
    ("EncoderConfig", {"d_vocab": 10, "rotary_base": "1e4"}, "rotary_base must be a finite number"),
    ("EncoderConfig", {"d_vocab": 10, "width": 3}, "unknown EncoderConfig fields: width"),
    ("EncoderConfig", [10], "EncoderConfig settings must be a JSON object"),
    ("TrainConfig", {"lr": "fast"}, "lr must be a finite number > 0, got 'fast'"),
    ("TrainConfig", {"steps": True}, "steps must be a positive integer, got True"),
    ("TrainConfig", {"batch_size": 8.0}, "batch_size must be a positive integer, got 8.0"),
    ("TrainConfig", {"epochs": 3}, "unknown TrainConfig fields: epochs"),
]


@pytest.mark.parametrize("cls,data,message", CONFIG_CASES, ids=[f"{c[0]} {c[2]}" for c in CONFIG_CASES])
def test_wrong_typed_config_fields_are_named(cls, data, message):
    import re

    from revlens.config import EncoderConfig
    from revlens.training import TrainConfig

    with pytest.raises(ValueError, match=re.escape(message)):
        {"EncoderConfig": EncoderConfig, "TrainConfig": TrainConfig}[cls].from_dict(data)


def test_a_checkpoint_config_with_a_wrong_typed_field_names_file_and_field(tmp_path, capsys):
    import hashlib

    out = tmp_path / "run"
    assert main(TINY_TRAIN + ["--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    config["model"]["d_model"] = "16"
    (out / "config.json").write_text(json.dumps(config))
    sums = json.loads((out / "checksums.json").read_text())
    sums["config.json"] = hashlib.sha256((out / "config.json").read_bytes()).hexdigest()
    (out / "checksums.json").write_text(json.dumps(sums))
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 2
    assert f"{out / 'config.json'}: d_model must be a positive integer, got '16'" in capsys.readouterr().err


# ---- revlens reproduce: a fresh results set, failures named and kept ------------------------------------------------

def _notebook(folder, name, *sources):
    import nbformat

    folder.mkdir(parents=True, exist_ok=True)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("a notebook")] + [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nb, folder / name)


@pytest.mark.slow
def test_reproduce_names_a_failing_notebook_keeps_it_and_never_mixes_runs(tmp_path, capsys, monkeypatch):
    import nbformat

    monkeypatch.setenv("REVLENS_REPORT_DIR", "")  # restored after the test (run_suite sets it)
    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "reports"
    _notebook(first, "01_ok.ipynb", "from revlens.reports import record\nrecord('01_ok', {'x': 1})")
    _notebook(first, "02_bad.ipynb", "y = 1", "raise RuntimeError('boom')", "z = 2")
    assert main(["reproduce", "--notebooks", str(first), "--out", str(out)]) == 2
    saved = out / "notebooks" / "02_bad.ipynb"
    err = capsys.readouterr().err
    assert f"notebook {first / '02_bad.ipynb'} failed in cell 3 (RuntimeError: boom)" in err and str(saved) in err
    cells = nbformat.read(saved, as_version=4).cells
    assert cells[2].outputs[0].output_type == "error" and cells[3].execution_count is None
    assert (out / "results" / "01_ok.json").is_file()

    (out / "sweep_mine.jsonl").write_text("{}\n")  # not written by reproduce: kept
    _notebook(second, "03_other.ipynb", "from revlens.reports import record\nrecord('03_other', {'y': 2})")
    assert main(["reproduce", "--notebooks", str(second), "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "results").iterdir()) == ["03_other.json"]
    assert sorted(p.name for p in (out / "notebooks").iterdir()) == ["03_other.ipynb"]
    assert "01_ok" not in (out / "summary.md").read_text() and (out / "sweep_mine.jsonl").read_text() == "{}\n"


REPRODUCE_REFUSED = [
    ("results it did not write", lambda out: (out / "results").mkdir(parents=True),
     "holds results that revlens reproduce did not write; refusing to replace them"),
    ("a summary it did not write", lambda out: out.mkdir() or (out / "summary.md").write_text("mine"),
     "holds summary.md that revlens reproduce did not write"),
    ("a file", lambda out: out.write_text("mine"), "exists and is not a folder"),
]


@pytest.mark.parametrize("case,make,message", REPRODUCE_REFUSED, ids=[c[0] for c in REPRODUCE_REFUSED])
def test_reproduce_refuses_an_out_it_did_not_write_before_running(tmp_path, capsys, monkeypatch, case, make, message):
    monkeypatch.setenv("REVLENS_REPORT_DIR", "")
    out = tmp_path / "reports"
    make(out)
    before = {p: p.read_bytes() for p in [out, *out.rglob("*")] if p.is_file()}
    _notebook(tmp_path / "nb", "01_ok.ipynb", "raise AssertionError('ran')")
    assert main(["reproduce", "--notebooks", str(tmp_path / "nb"), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert {p: p.read_bytes() for p in [out, *out.rglob("*")] if p.is_file()} == before
