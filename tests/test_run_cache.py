"""The run cache and checkpoints: damaged files are named and retrained, never served; saves are atomic."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from revlens import checkpoint, cli, training
from revlens.checkpoint import CorruptCheckpoint, load_run, save_run
from revlens.experiments import SETTINGS, Setting, train_setting
from revlens.run_cache import CacheWarning
from revlens.training import TrainConfig
from revlens.world import ReversalWorld

WORLD = ReversalWorld.generate(n_facts=10, n_control=2, seed=0)
SETTING = Setting("tiny-MDM", "mdm", {"d_model": 16, "n_heads": 2, "d_head": 8})
TRAIN = TrainConfig(steps=30, batch_size=16, log_every=15)


def cached(cache: Path) -> list[training.TrainRun]:
    return train_setting(SETTING, WORLD, (0, 1), TRAIN, cache_dir=cache, progress=False)


def entry(cache: Path, seed: int = 0) -> Path:
    (folder,) = (cache / "runs").glob(f"*/seed{seed}")
    return folder


def flip_bytes(path: Path, offset: int, count: int = 4) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def same_weights(a: list[training.TrainRun], b: list[training.TrainRun]) -> bool:
    return all(torch.equal(p, q) for x, y in zip(a, b) for p, q in zip(x.model.parameters(), y.model.parameters()))


@pytest.fixture()
def cache(tmp_path) -> tuple[Path, list[training.TrainRun]]:
    runs = cached(tmp_path / "cache")
    return tmp_path / "cache", runs


def test_cache_serves_identical_runs_and_keys_on_the_config(small_world, tmp_path):
    setting = SETTINGS["ARM"]
    cfg = TrainConfig(steps=20, batch_size=16, log_every=10)
    first = train_setting(setting, small_world, [0, 1], cfg, cache_dir=tmp_path, progress=False)
    again = train_setting(setting, small_world, [0, 1], cfg, cache_dir=tmp_path, progress=False)
    assert len(list((tmp_path / "runs").iterdir())) == 1
    for a, b in zip(first, again):
        assert "cos_all" in a.history[-1] and len(a.history) == len(b.history)
        for row_a, row_b in zip(a.history, b.history):
            assert row_a == pytest.approx(row_b, nan_ok=True)
        for p, q in zip(a.model.parameters(), b.model.parameters()):
            assert (p == q).all()
    train_setting(setting, small_world, [0, 1], TrainConfig(steps=21, batch_size=16, log_every=10),
                  cache_dir=tmp_path, progress=False)
    assert len(list((tmp_path / "runs").iterdir())) == 2


@pytest.mark.parametrize("damage", ["flip weights", "truncate weights", "flip history", "delete checksums", "flip checksums"])
def test_a_damaged_cache_entry_is_named_and_retrained_not_served(cache, damage):
    cache_dir, runs = cache
    folder = entry(cache_dir)
    weights, history = folder / checkpoint.WEIGHTS, folder / checkpoint.HISTORY
    if damage == "flip weights":
        flip_bytes(weights, weights.stat().st_size - 64)  # inside the tensor data: still a valid file
        named = weights
    elif damage == "truncate weights":
        weights.write_bytes(weights.read_bytes()[:-100])
        named = weights
    elif damage == "flip history":
        text = history.read_text()
        history.write_text(text.replace('"forward_acc": 1.0', '"forward_acc": 0.0').replace('"forward_acc": 0.', '"forward_acc": 1.'))
        assert history.read_text() != text
        named = history
    elif damage == "delete checksums":  # what a crash before the last write would leave
        (folder / checkpoint.CHECKSUMS).unlink()
        named = folder / checkpoint.CHECKSUMS
    else:
        flip_bytes(folder / checkpoint.CHECKSUMS, 20)
        named = folder / checkpoint.CHECKSUMS
    with pytest.warns(CacheWarning, match=f"{folder.parent}.*{named}"):
        again = cached(cache_dir)
    assert same_weights(again, runs)
    assert json.dumps([r.history for r in again]) == json.dumps([r.history for r in runs])  # NaN-safe equality
    checkpoint.verify_checksums(entry(cache_dir), required=True)  # healed
    assert same_weights(cached(cache_dir), runs)  # and now served from the cache


def test_a_partial_cache_entry_is_retrained_and_replaced(cache):
    """What a crash used to leave: one seed folder holding only its weights, the other missing."""
    cache_dir, runs = cache
    folder = entry(cache_dir)
    for path in folder.parent.iterdir():
        if path != folder:
            shutil.rmtree(path)
    for path in folder.iterdir():
        if path.name != checkpoint.WEIGHTS:
            path.unlink()
    assert same_weights(cached(cache_dir), runs)
    for seed in (0, 1):
        checkpoint.verify_checksums(entry(cache_dir, seed), required=True)


def test_evaluating_a_damaged_checkpoint_names_the_file(cache, capsys):
    folder = entry(cache[0])
    flip_bytes(folder / checkpoint.WEIGHTS, (folder / checkpoint.WEIGHTS).stat().st_size - 64)
    assert cli.main(["evaluate", str(folder)]) == 2
    assert f"{folder / checkpoint.WEIGHTS} does not match its checksum" in capsys.readouterr().err


def test_a_truncated_checkpoint_without_checksums_is_a_clear_error(cache):
    folder = entry(cache[0])
    (folder / checkpoint.CHECKSUMS).unlink()
    (folder / checkpoint.WEIGHTS).write_bytes((folder / checkpoint.WEIGHTS).read_bytes()[:200])
    with pytest.raises(CorruptCheckpoint, match=f"{folder / checkpoint.WEIGHTS} is not a readable safetensors file"):
        load_run(folder)


@pytest.mark.parametrize("problem", ["not json", "no seed", "no train"])
def test_a_bad_config_json_is_named(cache, problem):
    folder = entry(cache[0])
    (folder / checkpoint.CHECKSUMS).unlink()
    config = folder / checkpoint.CONFIG
    meta = json.loads(config.read_text())
    if problem == "not json":
        config.write_text(config.read_text()[:-30])
        match = f"{config}, line .*: not valid JSON"
    else:
        del meta[problem.split()[1]]
        config.write_text(json.dumps(meta))
        match = f"{config} lacks '{problem.split()[1]}'"
    with pytest.raises(ValueError, match=match):
        load_run(folder)


def test_a_failed_save_leaves_the_previous_checkpoint_intact(cache, tmp_path, monkeypatch):
    runs = cache[1]
    folder = save_run(runs[0], WORLD, tmp_path / "ck")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_write_json", fail)  # dies after the weights were written
    with pytest.raises(OSError, match="disk full"):
        save_run(runs[1], WORLD, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "ck"]  # no temporary folder left
    with pytest.raises(OSError):
        save_run(runs[1], WORLD, tmp_path / "new")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("where", ["existing file", "below a file", "foreign folder"])
def test_train_checks_its_destination_before_training(tmp_path, monkeypatch, capsys, where):
    def must_not_train(*args, **kwargs):
        raise AssertionError("trained before checking --out")

    monkeypatch.setattr(training, "train", must_not_train)
    (tmp_path / "file").write_text("x")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    out = {"existing file": tmp_path / "file", "below a file": tmp_path / "file" / "ck",
           "foreign folder": tmp_path / "notes"}[where]
    assert cli.main(["train", "--steps", "5", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error" in err and str(out) in err
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


def test_train_replaces_an_earlier_checkpoint(tmp_path, capsys):
    out = tmp_path / "ck"
    args = ["train", "--n-facts", "10", "--n-control", "2", "--d-model", "16", "--heads", "2", "--steps", "3",
            "--batch-size", "8", "--no-progress", "--out", str(out)]
    assert cli.main(args) == 0
    assert cli.main([*args[:-2], "--seed", "1", "--out", str(out)]) == 0
    assert load_run(out)[0].seed == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


@pytest.mark.parametrize("lr", ["nan", "inf", "-inf", "0"])
def test_non_finite_or_non_positive_lr_is_refused_before_training(tmp_path, capsys, lr):
    with pytest.raises(SystemExit) as exit_:  # refused while the arguments are read
        cli.main(["train", "--steps", "3", "--no-progress", f"--lr={lr}", "--out", str(tmp_path / "ck")])
    assert exit_.value.code == 2
    assert "argument --lr: must be a finite number > 0" in capsys.readouterr().err
    assert not (tmp_path / "ck").exists()


def test_training_stops_with_a_clear_message_when_the_loss_is_not_finite():
    cfg = SETTING.model_cfg(WORLD)
    with pytest.raises(ValueError, match=r"training diverged: the loss is .* at step \d+ \(seeds \[0, 1\]\)"):
        training.train(cfg, WORLD, TrainConfig(steps=50, batch_size=16, lr=1e20), (0, 1), progress=False)
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
        TrainConfig(weight_decay=float("nan"))


def test_code_fingerprint_hashes_subpackages_but_not_lm(tmp_path):
    """Cached runs retrain after an edit anywhere in the library (``revlens.routing`` is a subpackage), but
    not after one to the real-model code under ``lm/``; tested on a copy of the package, never the tree."""
    from revlens import run_cache

    package = Path(run_cache.__file__).parent
    root = tmp_path / "revlens"
    shutil.copytree(package, root, ignore=shutil.ignore_patterns("__pycache__"))
    assert run_cache.code_fingerprint(root) == run_cache.code_fingerprint()
    before = run_cache.code_fingerprint(root)

    lm_file = root / "lm" / "__init__.py"
    lm_file.write_text(lm_file.read_text() + "\n# an edit to the real-model code\n")
    (root / "lm" / "new_module.py").write_text("X = 1\n")
    assert run_cache.code_fingerprint(root) == before

    routing_file = root / "routing" / "world.py"
    original = routing_file.read_text()
    routing_file.write_text(original + "\n# an edit to a toy subpackage\n")
    assert run_cache.code_fingerprint(root) != before
    routing_file.write_text(original)
    assert run_cache.code_fingerprint(root) == before

    (root / "routing" / "world.py").rename(root / "routing" / "moved.py")  # same bytes, another path
    assert run_cache.code_fingerprint(root) != before
    (root / "routing" / "moved.py").rename(root / "routing" / "world.py")

    top = root / "plotting.py"
    top.write_text(top.read_text() + "\n# an edit to a top-level module\n")
    assert run_cache.code_fingerprint(root) != before
