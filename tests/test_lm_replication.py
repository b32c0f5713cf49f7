"""The pre-registered replication: the committed prediction file matches the rules the library checks, and
the checker judges synthetic scores as its rules say."""

import numpy as np
import pandas as pd
import pytest

from revlens.lm.replication import (PREDICTIONS, PREDICTIONS_FILE, REPLICATION_SEEDS, check_predictions,
                                    prediction_record, read_predictions, write_predictions)


def _scores(seed: int, mdm_correct: float, arm_correct: float, margin: float, n_persons: int = 20) -> pd.DataFrame:
    """Reverse forward-only rows of one seed: each person two queries; gold - foil = margin + noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for person in range(n_persons):
        for template in range(2):
            fact = 2 * person + template
            rows.append({"model": "llada", "decode": "parallel", "fact": fact, "person": f"p{person}",
                         "direction": "reverse", "split": "forward_only",
                         "correct": float(fact < mdm_correct * 2 * n_persons),
                         "logp": -3.0 + margin + rng.normal(0, 0.1), "foil_logp": -3.0, "seed": seed})
            rows.append(rows[-1] | {"decode": "sequential", "correct": 0.0})
            rows.append({"model": "llama", "decode": "sequential", "fact": fact, "person": f"p{person}",
                         "direction": "reverse", "split": "forward_only",
                         "correct": float(fact < arm_correct * 2 * n_persons), "logp": -9.0, "foil_logp": np.nan,
                         "seed": seed})
            rows.append(rows[-1] | {"direction": "forward", "correct": 1.0})  # other rows are ignored
    return pd.DataFrame(rows)


def test_shipped_prediction_file_states_the_rules_the_library_checks():
    record = read_predictions(PREDICTIONS_FILE)
    assert record["seeds"] == list(REPLICATION_SEEDS)
    assert [p["name"] for p in record["predictions"]] == [p.name for p in PREDICTIONS]


def test_checker_scores_hits_and_misses_per_seed():
    record = prediction_record(seeds=(3, 4))
    scores = pd.concat([_scores(3, mdm_correct=0.5, arm_correct=0.0, margin=1.0),
                        _scores(4, mdm_correct=0.0, arm_correct=0.1, margin=-1.0)])
    table = check_predictions(record, scores).set_index(["seed", "prediction"]).hit
    assert table[(3, "mdm above arm")] and table[(3, "gold above foil")] and table[(3, "arm at zero")]
    assert not table[(4, "mdm above arm")] and not table[(4, "gold above foil")] and not table[(4, "arm at zero")]


def test_a_margin_whose_interval_reaches_zero_is_a_miss():
    scores = _scores(3, mdm_correct=0.5, arm_correct=0.0, margin=0.01)
    hit = check_predictions(prediction_record(seeds=(3,)), scores).set_index("prediction").hit
    assert not hit["gold above foil"]


def test_a_registered_seed_without_scores_is_an_error_not_a_miss():
    with pytest.raises(ValueError, match="registered seed 5"):
        check_predictions(prediction_record(seeds=(3, 5)), _scores(3, 0.5, 0.0, 1.0))


def test_predictions_are_written_once(tmp_path):
    path = write_predictions(tmp_path / "p.json")
    assert read_predictions(path)["seeds"] == list(REPLICATION_SEEDS)
    with pytest.raises(FileExistsError, match="registered already"):
        write_predictions(path)


def test_a_file_with_other_rules_is_refused(tmp_path):
    import json

    record = prediction_record()
    record["predictions"][1]["rule"] = "gold - foil above -1"
    (tmp_path / "p.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="'predictions'"):
        read_predictions(tmp_path / "p.json")


def test_shipped_seed_table_judges_as_shipped():
    """data/small_pair/seeds.jsonl holds both models at every registered seed and the ARM at seeds 0-2, and the
    registered predictions, judged on it, come out as notebook 08 reports them (nine hits)."""
    from revlens.lm.replication import SEEDS_TABLE, seed_summary

    scores = pd.read_json(SEEDS_TABLE, lines=True)
    assert sorted(scores[scores.model == "llama"].seed.unique()) == [0, 1, 2, 3, 4, 5]
    assert sorted(scores[scores.model == "llada"].seed.unique()) == [0, 3, 4, 5]
    assert set(scores[scores.model == "llada"].decode) == {"sequential", "parallel"}
    hits = check_predictions(read_predictions(PREDICTIONS_FILE), scores)
    assert len(hits) == 9 and hits.hit.all()
    summary = seed_summary(scores)
    assert (summary["ARM reverse"] == 0).all() and (summary["ARM forward"] == 1).all()
