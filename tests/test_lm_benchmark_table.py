"""Shipping text-reversal runs as a numbers-only table (revlens.lm.benchmark_table): merging seeds and maskings,
refusing runs that differ otherwise, never writing a sentence of the data, and reading a table back against its
run.json (also the shipped table of the released data, when data/text_reversal/ is there)."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

from revlens.lm.benchmark_table import (FILES, HISTORY_COLUMNS, RELEASE, RESULT_COLUMNS, TRAINING_COLUMNS,
                                        DataSource, check_no_sentences, check_numbers_only, check_shipped, ship_runs)
from revlens.lm.text_reversal import (ARM_LABEL, MDM_LABEL, HarnessConfig, data_fingerprint, read_layout,
                                      run_text_reversal, seed_means)
from revlens.lm.trainer import PairConfig

ROOT = Path(__file__).parents[1]
FIXTURE = ROOT / "tests" / "data" / "reversal_layout"
SHIPPED = ROOT / "data" / "text_reversal"
TINY = PairConfig(steps=0, d_model=16, n_heads=2, mlp_hidden_size=32, batch_size=8)
QUICK = HarnessConfig(pair=TINY, max_steps=2, min_steps=0, eval_every=2, patience=1)
COMMIT = "0" * 40


def assert_shipped_table(dest: Path) -> dict:
    """A shipped table has exactly the documented files and columns, and every table holds exactly the (masking,
    seed) pairs its run.json claims, each with an MDM and an ARM scored on every file; returns run.json."""
    assert sorted(p.name for p in dest.iterdir()) == ["history.csv", "results.csv", "run.json", "training.csv"]
    run = json.loads((dest / "run.json").read_text())
    claimed = {(m, s) for m, seeds in run["shipped"].items() for s in seeds}
    assert claimed and claimed == {(r["masking"], s) for r in run["runs"] for s in r["seeds"]}
    assert all("text-reversal" in r["command"] for r in run["runs"]) and run["data"]["sha256"]
    for name, columns in (("results.csv", RESULT_COLUMNS), ("training.csv", TRAINING_COLUMNS),
                          ("history.csv", HISTORY_COLUMNS)):
        table = pd.read_csv(dest / name)
        assert list(table.columns) == columns, name
        assert set(zip(table.masking, table.seed)) == claimed, name
    results = pd.read_csv(dest / "results.csv")
    for (masking, seed), rows in results.groupby(["masking", "seed"]):
        assert {MDM_LABEL, ARM_LABEL} <= set(rows.model)
        for model, per in rows.groupby("model"):
            assert set(per.file) == set(FILES), (masking, seed, model)
    check_shipped(dest)  # and the library's own reading agrees
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Finished fixture runs of one configuration: token masking at seeds 0 and 1, entity masking at seed 0, and the
    MDM alone with entity masking at seed 1."""
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # models this small run fastest on one thread (several spin on a busy machine)
    try:
        run_text_reversal(FIXTURE, root / "token", replace(QUICK, seeds=(0, 1)))
        run_text_reversal(FIXTURE, root / "entity", replace(QUICK, pair=replace(TINY, masking="entity")))
        run_text_reversal(FIXTURE, root / "entity_mdm", replace(QUICK, pair=replace(TINY, masking="entity"), seeds=(1,),
                                                                models=("llada",)))
    finally:
        torch.set_num_threads(threads)
    return root


OPTIONS = "--d-model 16 --heads 2 --max-steps 2 --min-steps 0 --eval-every 2 --patience 1"
"""The command-line options of QUICK (the MLP width and batch size are set in Python: no option names them)."""


def _command(folder: Path) -> str:
    config = json.loads((folder / "training.json").read_text())["config"]
    seeds = " ".join(map(str, config["seeds"]))
    masking, models = config["pair"]["masking"], " ".join(config["models"])
    return (f"revlens text-reversal {FIXTURE} --out {folder} --seeds {seeds} --masking {masking} --models {models} "
            f"{OPTIONS}")


def _ship(folders, dest, **kw):
    commands = [_command(f) if (f / "training.json").is_file() else "revlens text-reversal x --out y" for f in folders]
    return ship_runs(folders, dest, **({"commands": commands, "source": RELEASE, "revlens_commit": COMMIT} | kw))


@pytest.mark.slow
def test_ship_merges_seeds_and_maskings_into_numbers_only_tables(runs, tmp_path):
    table = _ship([runs / "token", runs / "entity"], tmp_path / "table", data_dir=FIXTURE)
    run = assert_shipped_table(tmp_path / "table")
    assert run["shipped"] == {"token": [0, 1], "entity": [0]} == table.shipped
    assert run["data"] == {"repository": RELEASE.repository, "commit": RELEASE.commit, "folder": RELEASE.folder,
                           "sha256": data_fingerprint(FIXTURE)}
    assert [r["revlens_commit"] for r in run["runs"]] == [COMMIT] * 2 and "seeds" not in run["config"] and "masking" not in run["config"]["pair"]
    # the numbers are the runs' own, bit for bit, with the masking added and the seed-mean rows left out
    own = pd.read_csv(runs / "token" / "results.csv", dtype={"seed": str})
    own = own[own.seed != "mean"].assign(seed=lambda t: t.seed.astype(int))
    shipped = table.results[table.results.masking == "token"].drop(columns="masking")
    key = ["file", "model", "seed", "metric"]
    pd.testing.assert_frame_equal(shipped.sort_values(key).reset_index(drop=True),
                                  own[shipped.columns].sort_values(key).reset_index(drop=True), check_exact=True)
    record = json.loads((runs / "entity" / "training.json").read_text())["models"]["seed0"]
    entity = table.training[table.training.masking == "entity"].set_index("model")
    assert entity.loc[MDM_LABEL, "steps"] == record["llada"]["steps"]
    assert entity.loc[ARM_LABEL, "held-out accuracy"] == record["llama"]["held-out accuracy"]
    assert len(table.history[table.history.masking == "entity"]) == sum(len(e["history"]) for e in record.values())
    # means over seeds of the shipped table: the mean of the two seeds, converged only when both are
    means = seed_means(table.results[table.results.masking == "token"], ["file", "model", "metric"])
    one = means[(means.file == FILES[0]) & (means.model == MDM_LABEL) & (means.metric == "mean gold logp")].iloc[0]
    per_seed = shipped[(shipped.file == FILES[0]) & (shipped.model == MDM_LABEL) & (shipped.metric == "mean gold logp")]
    assert one.value == pytest.approx(per_seed.value.mean()) and one.half_width > 0


@pytest.mark.slow
def test_an_mdm_alone_ships_beside_the_arm_of_its_seed_from_another_masking(runs, tmp_path):
    """The ARM's training does not depend on the masking, so a run may train the MDM alone; it ships only where the
    same seed's ARM is shipped from another run."""
    table = _ship([runs / "token", runs / "entity", runs / "entity_mdm"], tmp_path / "table", data_dir=FIXTURE)
    assert table.shipped == {"token": [0, 1], "entity": [0, 1]}
    entity1 = table.training[(table.training.masking == "entity") & (table.training.seed == 1)]
    assert list(entity1.model) == [MDM_LABEL]
    assert [r["models"] for r in table.run["runs"]] == [["llada", "llama"]] * 2 + [["llada"]]
    with pytest.raises(ValueError, match=r"masking entity, seed 1 has models .*ARM \(LLaMA arch.\) at this seed here "
                                         "or under another masking"):
        _ship([runs / "entity", runs / "entity_mdm"], tmp_path / "alone")
    with pytest.raises(ValueError, match="--models"):  # the command must say the run trained the MDM alone
        ship_runs([runs / "entity_mdm"], tmp_path / "cmd", commands=[_command(runs / "entity_mdm").replace(
            "--models llada", "")], source=RELEASE, revlens_commit=COMMIT)


@pytest.mark.slow
def test_nothing_of_the_data_is_shipped(runs, tmp_path):
    _ship([runs / "token"], tmp_path / "table")
    shipped = " ".join(p.read_text().lower() for p in (tmp_path / "table").iterdir())
    layout = read_layout(FIXTURE)
    texts = {" ".join(t.lower().split()) for examples in layout.values() for ex in examples
             for t in (ex.prompt, ex.completion)}
    assert not [t for t in texts if len(t.split()) >= 2 and t in shipped]
    # controls: the run's scores.jsonl holds the sentences, and the checks refuse any of them
    leak = shutil.copytree(tmp_path / "table", tmp_path / "leak")
    shutil.copy(runs / "token" / "scores.jsonl", leak)
    with pytest.raises(ValueError, match="holds .*scores.jsonl"):
        check_numbers_only(leak)
    with pytest.raises(ValueError, match="scores.jsonl contains a text of"):
        check_no_sentences(leak, layout)
    (leak / "scores.jsonl").unlink()
    sentence = layout["p2d_prompts_train.jsonl"][0]
    results = pd.read_csv(leak / "results.csv")
    results.loc[0, "model"] = sentence.prompt
    results.to_csv(leak / "results.csv", index=False)
    with pytest.raises(ValueError, match="column 'model' holds .*not a known name"):
        check_numbers_only(leak)
    shutil.copy(tmp_path / "table" / "results.csv", leak)
    run = json.loads((leak / "run.json").read_text())
    run["config"]["note"] = sentence.completion
    (leak / "run.json").write_text(json.dumps(run))
    with pytest.raises(ValueError, match="config.note holds .*not a known name"):
        check_numbers_only(leak)
    command = _command(runs / "token")
    for bad, message in ((f"{command} --out '{sentence.prompt}'", "argument with whitespace"),
                         (f"{sentence.prompt} {command}", "before text-reversal is neither"),
                         (f"{command} {sentence.completion}", "not a revlens command line"),
                         (command.replace("--d-model 16", "--d-model 32"), "gives --d-model 32, but its run folder "
                                                                           "was trained with 16"),
                         (command.replace("--seeds 0 1", "--seeds 0"), r"trains seeds \[0\], its run folder seeds")):
        with pytest.raises(ValueError, match=message):
            _ship([runs / "token"], tmp_path / "other", commands=[bad])
    assert not (tmp_path / "other").exists()


def _edited_copy(src: Path, dest: Path, edit) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("seed*"))
    record = json.loads((dest / "training.json").read_text())
    edit(record)
    (dest / "training.json").write_text(json.dumps(record))
    return dest


@pytest.mark.slow
def test_runs_that_differ_in_more_than_seeds_and_masking_are_refused(runs, tmp_path):
    lr = _edited_copy(runs / "entity", tmp_path / "lr", lambda r: r["config"]["pair"].update(lr=1e-3))
    with pytest.raises(ValueError, match=r"differ in config\.pair\.lr \(0\.001 vs 0\.002\)"):
        _ship([runs / "token", lr], tmp_path / "table")
    data = _edited_copy(runs / "entity", tmp_path / "data",
                        lambda r: r["data"].update({"d2p_prompts_train.jsonl": "f" * 64}))
    with pytest.raises(ValueError, match=r"differ in data\.d2p_prompts_train\.jsonl"):
        _ship([runs / "token", data], tmp_path / "table")
    with pytest.raises(ValueError, match="masking 'token', seed 0 is also in an earlier run folder"):
        _ship([runs / "token", runs / "token"], tmp_path / "table")
    other = shutil.copytree(FIXTURE, tmp_path / "other_data")
    (other / "p2d_prompts_test.jsonl").write_text((other / "p2d_prompts_test.jsonl").read_text()[::-1][1:] + "\n")
    with pytest.raises(ValueError, match="not the data the runs were trained on .*p2d_prompts_test.jsonl"):
        _ship([runs / "token"], tmp_path / "table", data_dir=other)
    with pytest.raises(ValueError, match="revlens_commit must be a full git commit"):
        _ship([runs / "token"], tmp_path / "table", revlens_commit="HEAD")
    with pytest.raises(ValueError, match="one command per run folder"):
        _ship([runs / "token"], tmp_path / "table", commands=[])
    with pytest.raises(ValueError, match="not a finished text-reversal run"):
        _ship([tmp_path], tmp_path / "table")
    with pytest.raises(ValueError, match="commit must be a full git commit"):
        DataSource(RELEASE.repository, "6af5f41", RELEASE.folder)
    with pytest.raises(ValueError, match="holds the run folder"):
        _ship([runs / "token"], runs, overwrite=True)
    assert not (tmp_path / "table").exists()  # nothing written on any refusal
    _ship([runs / "token"], tmp_path / "table")
    with pytest.raises(ValueError, match="is not empty; pass overwrite=True"):
        _ship([runs / "entity"], tmp_path / "table")
    assert _ship([runs / "entity"], tmp_path / "table", overwrite=True).shipped == {"entity": [0]}


@pytest.mark.slow
def test_runs_added_to_a_shipped_table_equal_shipping_them_together(runs, tmp_path):
    """Seeds trained at another time (another revlens commit) are added to a table already shipped; the result is
    the table shipping all runs at once would give, with each run's own commit."""
    together = _ship([runs / "token", runs / "entity", runs / "entity_mdm"], tmp_path / "together")
    _ship([runs / "token"], tmp_path / "added")
    later = "1" * 40
    added = _ship([runs / "entity", runs / "entity_mdm"], tmp_path / "added", add=True, revlens_commit=later,
                  data_dir=FIXTURE)
    for name in ("results", "training", "history"):
        pd.testing.assert_frame_equal(getattr(added, name), getattr(together, name), check_exact=True)
    assert added.shipped == together.shipped == {"token": [0, 1], "entity": [0, 1]}
    assert [r["revlens_commit"] for r in added.run["runs"]] == [COMMIT, later, later]
    assert {k: v for k, v in added.run.items() if k != "runs"} == {k: v for k, v in together.run.items() if k != "runs"}
    before = {p.name: p.read_bytes() for p in (tmp_path / "added").iterdir()}
    with pytest.raises(ValueError, match="masking 'token', seed 0 is also in an earlier run folder or the table"):
        _ship([runs / "token"], tmp_path / "added", add=True)
    lr = _edited_copy(runs / "entity", tmp_path / "lr", lambda r: r["config"]["pair"].update(lr=1e-3))
    with pytest.raises(ValueError, match=r"the runs and .* differ in config\.pair\.lr \(0\.001 vs 0\.002\)"):
        _ship([lr], tmp_path / "added", add=True)
    with pytest.raises(ValueError, match="names another source"):
        _ship([runs / "entity"], tmp_path / "added", add=True, source=replace(RELEASE, commit="2" * 40))
    with pytest.raises(ValueError, match="pass one of them"):
        _ship([runs / "entity"], tmp_path / "added", add=True, overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "added").iterdir()} == before  # refusals write nothing
    with pytest.raises(FileNotFoundError, match="no shipped table here"):
        _ship([runs / "entity"], tmp_path / "none", add=True)


@pytest.mark.slow
def test_a_table_that_is_not_what_its_run_json_claims_is_refused(runs, tmp_path):
    _ship([runs / "token"], tmp_path / "table")
    run = json.loads((tmp_path / "table" / "run.json").read_text())
    run["shipped"]["token"].append(2)
    run["runs"][0]["seeds"].append(2)
    (tmp_path / "table" / "run.json").write_text(json.dumps(run))
    with pytest.raises(ValueError, match=r"results.csv: \(masking, seed\) pairs .* but run.json claims"):
        check_shipped(tmp_path / "table")
    with pytest.raises(FileNotFoundError, match="no shipped table here"):
        check_shipped(tmp_path)


@pytest.mark.skipif(not (SHIPPED / "run.json").is_file(),
                    reason="data/text_reversal/ is not shipped yet: it is written by revlens.lm.benchmark_table."
                           "ship_runs from runs of revlens text-reversal on the released folder")
def test_the_shipped_table_of_the_released_data():
    run = assert_shipped_table(SHIPPED)
    assert {k: run["data"][k] for k in ("repository", "commit", "folder")} == {
        "repository": RELEASE.repository, "commit": RELEASE.commit, "folder": RELEASE.folder}
    assert set(run["shipped"]) <= {"token", "entity"}
