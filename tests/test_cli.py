import json

import pytest

from revlens.cli import main
from revlens.reports import record, save_figure, summary_markdown


def test_train_then_evaluate_round_trip(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--objective", "arm", "--steps", "150", "--n-facts", "20", "--n-control", "4",
               "--d-model", "32", "--heads", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"forward_acc", "inplace_acc", "reverse_acc", "control_reverse_acc", "chance"} <= set(metrics)
    assert metrics["inplace_acc"] is None  # undefined for a left-to-right model, written as null
    assert metrics["chance"] == pytest.approx(1 / 20)
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated == pytest.approx(metrics)
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["attention_dir"] == "causal" and config["seed"] == 0


def test_bad_input_gives_a_clear_error(tmp_path, capsys):
    assert main(["train", "--n-facts", "5", "--n-control", "5", "--out", str(tmp_path / "x")]) == 2
    assert "leaves no room for both splits" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing")]) == 2
    assert "not a revlens checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--positional", "sinusoidal", "--out", str(tmp_path / "y")])
    assert "invalid choice: 'sinusoidal'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train --world", "sweep", "facts --facts"])
def test_files_that_are_not_json_are_named_with_their_line(tmp_path, capsys, command):
    bad = tmp_path / "bad.json"
    bad.write_text('{"n_facts": 4,\n "facts": [[}')
    args = {"train --world": ["train", "--world", str(bad), "--out", str(tmp_path / "ck")],
            "sweep": ["sweep", str(bad), "--out", str(tmp_path / "t.jsonl")],
            "facts --facts": ["facts", str(tmp_path), "--facts", str(bad)]}[command]
    if command.startswith("facts"):  # the model folder is checked first: give it one that loads
        pytest.importorskip("transformers")
        from tests.lm_checkpoints import llada_checkpoint

        args[1] = str(llada_checkpoint(tmp_path / "model"))
    assert main(args) == 2
    assert f"{bad}, line 2, column 13: not valid JSON" in capsys.readouterr().err


def test_reports_write_only_when_a_report_folder_is_set(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    monkeypatch.delenv("REVLENS_REPORT_DIR", raising=False)
    assert save_figure(fig, "f") is None and record("nb", {"a": 1}) is None
    monkeypatch.setenv("REVLENS_REPORT_DIR", str(tmp_path))
    assert save_figure(fig, "f").is_file()
    record("nb", {"a": 1})
    record("nb", {"b": 2.5})
    assert json.loads((tmp_path / "results" / "nb.json").read_text()) == {"a": 1, "b": 2.5}
    text = summary_markdown(tmp_path)
    assert "**b**: 2.5" in text and "figures/f.png" in text
    plt.close(fig)


@pytest.mark.slow
def test_small_pair_command_writes_loadable_checkpoints(tmp_path, capsys):
    from revlens.lm import HookedLM

    assert main(["small-pair", "--steps", "2", "--out", str(tmp_path / "pair"), "--switch-seeds", "1",
                 "--runs", str(tmp_path / "runs")]) == 0
    assert "small pair written to" in capsys.readouterr().out
    record = json.loads((tmp_path / "pair" / "training.json").read_text())
    assert record["config"]["steps"] == 2 and "llama reverse forward_only" in record["accuracy"]
    assert HookedLM.from_pretrained(tmp_path / "pair" / "llama").family.name == "llama"
    switches = [json.loads(line) for line in (tmp_path / "pair" / "switches.jsonl").read_text().splitlines()]
    # three MDM switches and the two ARMs they need (the ARM reads the wording, not the masking)
    assert len({r["switch"] for r in switches}) == 3 + 2 and {r["seed"] for r in switches} == {0}
    assert {r["model"] for r in switches if r["switch"].startswith("ARM")} == {"llama"}
    heads = [json.loads(line) for line in (tmp_path / "pair" / "heads.jsonl").read_text().splitlines()]
    # the three 2-layer switch MDMs (8 heads each) and the pair's 4-layer MDM (16 heads; one seed, no replicates)
    assert len(heads) == 3 * 2 * 4 + 4 * 4 and {"route corr fwd/rev (trained)", "layer", "head", "seed"} <= set(heads[0])
    assert not list((tmp_path / "pair").glob("replicate_seed*.json"))


@pytest.mark.slow
def test_small_pair_command_trains_one_model_at_another_seed_with_a_curve(tmp_path, capsys):
    out = tmp_path / "mdm"
    assert main(["small-pair", "--steps", "2", "--out", str(out), "--models", "llada", "--seed", "1", "--lr", "1e-3",
                 "--curve-every", "1"]) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["config"]["seed"] == 1 and record["config"]["lr"] == 1e-3
    assert [p["step"] for p in record["llada_curve"]] == [1, 2]
    assert not (out / "llama").exists() and "llama_steps" not in record
    assert main(["small-pair", "--steps", "2", "--out", str(out), "--models", "llada", "--switch-seeds", "1"]) == 2
    assert "not --models" in capsys.readouterr().err
    # the ARM of the same configuration trained into the same folder keeps the MDM's record, at its own interval
    assert main(["small-pair", "--steps", "2", "--out", str(out), "--models", "llama", "--seed", "1", "--lr", "1e-3",
                 "--curve-every", "1", "--arm-curve-every", "2"]) == 0
    record = json.loads((out / "training.json").read_text())
    assert [p["step"] for p in record["llada_curve"]] == [1, 2] and [p["step"] for p in record["llama_curve"]] == [2]
    assert {"llada forward control", "llama forward control"} <= set(record["accuracy"])
    with pytest.raises(SystemExit):
        main(["small-pair", "--lr", "0", "--out", str(out)])
    assert "--lr: must be a finite number > 0, got '0'" in capsys.readouterr().err


@pytest.mark.slow
def test_text_reversal_command(tmp_path, capsys):
    assert main(["text-reversal", "tests/data/reversal_layout", "--out", str(tmp_path / "run"), "--layers", "1",
                 "--d-model", "16", "--heads", "2", "--max-steps", "2", "--eval-every", "2"]) == 0
    printed = capsys.readouterr().out
    assert "p2d_reverse_prompts_test.jsonl" in printed and "mean gold rank" in printed
    assert main(["text-reversal", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_facts_command_scores_both_directions(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    assert main(["facts", "data/small_pair/llama", "--facts", "data/small_pair/world.json", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rule: startswith" in printed and "wrote_author" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["direction"] for r in rows} == {"forward", "reverse"} and len(rows) == 2 * 480
    assert main(["facts", str(tmp_path / "missing")]) == 2
    assert "not a model folder" in capsys.readouterr().err


def test_facts_command_decodes_a_masked_model_in_parallel(capsys):
    assert main(["facts", "data/small_pair/llada", "--facts", "data/small_pair/world.json", "--decode", "parallel"]) == 0
    assert "decode: parallel" in capsys.readouterr().out
    assert main(["facts", "data/small_pair/llama", "--facts", "data/small_pair/world.json", "--decode", "parallel"]) == 2
    assert "left-to-right" in capsys.readouterr().err
