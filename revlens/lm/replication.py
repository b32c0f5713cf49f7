"""A pre-registered replication of the small pair's recipe at seeds it was never run with.

The shipped recipe (:data:`revlens.lm.small_pair.SHIPPED_PAIR`: peak learning rate, whole-entity masking,
parallel decoding for the headline) was settled after its results at seeds 0-2 had been seen, so those seeds
cannot test it. :func:`write_predictions` writes what the recipe predicts at fresh seeds
(:data:`REPLICATION_SEEDS`) into a file, and that file is committed before any model at those seeds is trained:
the repository's history shows the order. :func:`check_predictions` then scores every prediction, seed by
seed, against the trained pairs' per-fact scores (:func:`revlens.lm.small_pair.pair_scores`) by the rule
written in the file, and :func:`read_predictions` refuses a file whose rules are not the ones this module
checks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd

from revlens import provenance
from revlens.atomic import write_json_atomic
from revlens.config import load_json
from revlens.stats import mean_ci
from revlens.lm.small_pair import SHIPPED_PAIR, SMALL_PAIR_DIR
from revlens.lm.trainer import PairConfig

REPLICATION_SEEDS: tuple[int, ...] = (3, 4, 5)
"""Fresh seeds: each draws its own world (people, titles, which facts are controls), initialisation and batches."""

PREDICTIONS_FILE = SMALL_PAIR_DIR / "replication_predictions.json"

DECODE = "parallel"
"""The MDM decoding the predictions are about (the shipped headline's); log-probabilities are scored the same way."""

SPLIT = "forward_only"
"""Facts stated in one direction only in training: their reverse query is the test of the reversal curse."""


@dataclass(frozen=True)
class Prediction:
    """One pre-registered prediction, judged at every seed on its own."""

    name: str
    rule: str


PREDICTIONS: tuple[Prediction, ...] = (
    Prediction("mdm above arm",
               "MDM reverse accuracy on forward-only facts (parallel decoding, startswith rule) is strictly above "
               "the ARM's at the same seed"),
    Prediction("gold above foil",
               "MDM reverse gold minus foil log-probability on forward-only facts (parallel decoding; each "
               "person's queries averaged first): the lower end of its 95% Student-t interval over persons is "
               "above 0"),
    Prediction("arm at zero",
               "ARM reverse accuracy on forward-only facts is exactly 0 (no fact answered)"),
)


def prediction_record(seeds: tuple[int, ...] = REPLICATION_SEEDS, pc: PairConfig = SHIPPED_PAIR) -> dict:
    """What :func:`write_predictions` writes: the recipe (every field but the seed), the seeds, the decoding,
    the split, each prediction's rule, and the command that trains one seed's pair."""
    recipe = asdict(replace(pc, seed=0))
    del recipe["seed"]
    return {"recipe": recipe, "seeds": list(seeds), "decode": DECODE, "split": SPLIT,
            "predictions": [asdict(p) for p in PREDICTIONS],
            "train": "revlens small-pair --seed K --out runs/replication/seedK (K in seeds)"}


def write_predictions(path: str | Path = PREDICTIONS_FILE, seeds: tuple[int, ...] = REPLICATION_SEEDS,
                      pc: PairConfig = SHIPPED_PAIR) -> Path:
    """Write the prediction file (refused when one is there: a pre-registration is written once)."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists: the predictions were registered already; they are not rewritten")
    write_json_atomic(path, prediction_record(seeds, pc))
    return path


def read_predictions(path: str | Path = PREDICTIONS_FILE, pc: PairConfig = SHIPPED_PAIR) -> dict:
    """The registered predictions, checked against this module: same recipe, decoding, split and rules (a file
    whose rules differ would be judged by rules it does not state, so it is refused, naming the difference)."""
    record = load_json(Path(path))
    expected = prediction_record(tuple(record.get("seeds", ())), pc)
    for key in ("recipe", "decode", "split", "predictions"):
        if record.get(key) != expected[key]:
            raise ValueError(f"{path}: {key!r} is {record.get(key)!r}, but this library checks {expected[key]!r}")
    return record


def check_predictions(record: dict, scores: pd.DataFrame) -> pd.DataFrame:
    """Every registered prediction at every registered seed: one row per (seed, prediction) with what was
    measured and ``hit``. ``scores``: :func:`~revlens.lm.small_pair.pair_scores` rows with a ``seed`` column;
    a registered seed with no rows is an error (a missing seed is not a miss, nor a hit)."""
    rows = []
    for seed in record["seeds"]:
        at_seed = scores[scores.seed == seed]
        if at_seed.empty:
            raise ValueError(f"no scores for registered seed {seed}: train it before checking the predictions")
        m = seed_summary(at_seed).loc[seed]
        mdm, arm, margin, half = m[f"MDM reverse, {DECODE}"], m["ARM reverse"], m["MDM gold - foil"], m["MDM ±"]
        if pd.isna(mdm) or pd.isna(arm):
            raise ValueError(f"seed {seed} needs both models' reverse scores on forward-only facts "
                             f"(the MDM under {DECODE!r} decoding)")
        judged = {"mdm above arm": (mdm > arm, f"MDM {mdm:.2f} vs ARM {arm:.2f}"),
                  "gold above foil": (margin - half > 0, f"{margin:.2f} ± {half:.2f} nats"),
                  "arm at zero": (arm == 0, f"ARM {arm:.3f}")}
        for p in record["predictions"]:
            hit, measured = judged[p["name"]]
            rows.append({"seed": seed, "prediction": p["name"], "measured": measured, "hit": bool(hit)})
    return pd.DataFrame(rows)


def seed_summary(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per seed of a :func:`seed_scores` table, on forward-only facts: the MDM's forward and reverse
    accuracy under both decodings, the ARM's, and each model's reverse gold - foil (the MDM's under parallel
    decoding; mean and 95% half-width over persons: the ARM's is the no-knowledge reference). A model a seed lacks
    gives NaN."""
    fo = scores[scores.split == SPLIT]
    rows = []
    for seed, at_seed in fo.groupby("seed"):
        row: dict[str, float] = {"seed": int(seed)}
        for model, decode, direction, column in (("llada", "parallel", "forward", "MDM forward, parallel"),
                                                 ("llada", "parallel", "reverse", "MDM reverse, parallel"),
                                                 ("llada", "sequential", "reverse", "MDM reverse, sequential"),
                                                 ("llama", "sequential", "forward", "ARM forward"),
                                                 ("llama", "sequential", "reverse", "ARM reverse")):
            cell = at_seed[(at_seed.model == model) & (at_seed.decode == decode) & (at_seed.direction == direction)]
            row[column] = float(cell.correct.mean()) if len(cell) else float("nan")
        for model, decode, label in (("llada", DECODE, "MDM"), ("llama", "sequential", "ARM")):
            rev = at_seed[(at_seed.model == model) & (at_seed.decode == decode) & (at_seed.direction == "reverse")]
            margin = mean_ci((rev.logp - rev.foil_logp).groupby(rev.person).mean()) if len(rev) else (float("nan"),) * 2
            row[f"{label} gold - foil"], row[f"{label} ±"] = margin
        rows.append(row)
    return pd.DataFrame(rows).set_index("seed")


_RECORD_KEYS = {"MDM forward, parallel": "llada forward forward_only, parallel",
                "MDM reverse, parallel": "llada reverse forward_only, parallel",
                "MDM reverse, sequential": "llada reverse forward_only"}


def record_summary(records: dict[int, dict]) -> pd.DataFrame:
    """:func:`seed_summary`'s MDM accuracy columns from training records (``training.json`` of a pair whose
    models are not shipped, scored when it was trained), one row per seed; the margin is not in a record (NaN)."""
    rows = [{"seed": seed, **{column: float(record["accuracy"][key]) for column, key in _RECORD_KEYS.items()}}
            for seed, record in records.items()]
    return pd.DataFrame(rows).set_index("seed")


SEEDS_TABLE = SMALL_PAIR_DIR / "seeds.jsonl"
"""Per-fact scores of the recipe's pairs at every seed trained (the shipped pair is seed 0)."""


def seed_folders(runs: str | Path, seeds: tuple[int, ...]) -> dict[int, Path]:
    """Where each seed's pair is: the shipped pair for its own seed, ``runs/seed<k>`` for the others."""
    shipped = load_json(SMALL_PAIR_DIR / "training.json")["config"]["seed"]
    return {k: SMALL_PAIR_DIR if k == shipped else Path(runs) / f"seed{k}" for k in seeds}


def seed_scores(runs: str | Path, seeds: tuple[int, ...], pc: PairConfig = SHIPPED_PAIR) -> pd.DataFrame:
    """Per-fact scores (:func:`~revlens.lm.small_pair.pair_scores`, with ``seed``) of every model of the recipe
    found at ``seeds`` (a seed may hold only one of the two models); a folder trained with another recipe is
    refused."""
    from revlens.lm.small_pair import pair_scores

    tables = []
    for seed, folder in seed_folders(runs, seeds).items():
        config = load_json(folder / "training.json")["config"]
        if config != asdict(replace(pc, seed=seed)):
            raise ValueError(f"{folder} was trained with another recipe than the shipped one at seed {seed}: {config}")
        models = tuple(m for m in ("llada", "llama") if (folder / m / "model.safetensors").is_file())
        tables.append(pair_scores(folder, models).assign(seed=seed))
    return pd.concat(tables, ignore_index=True)


def write_seed_table(runs: str | Path, seeds: tuple[int, ...], out: str | Path = SEEDS_TABLE) -> Path:
    """Score every seed's models (:func:`seed_scores`) and write the table notebook 08 reads (JSON lines)."""
    from revlens.atomic import write_text_atomic

    table = seed_scores(runs, seeds)
    write_text_atomic(Path(out), table.to_json(orient="records", lines=True))
    return Path(out)


def registration_commit(path: str | Path = PREDICTIONS_FILE) -> str:
    """The commit that added ``path`` (default: the prediction file); see :func:`revlens.provenance.registration_commit`."""
    return provenance.registration_commit(path)


def registered_before(first: str | Path = PREDICTIONS_FILE, second: str | Path = SEEDS_TABLE) -> bool | None:
    """Whether the predictions were committed before the seed table; see :func:`revlens.provenance.registered_before`."""
    return provenance.registered_before(first, second)


if __name__ == "__main__":  # python -m revlens.lm.replication {register | score RUNS}
    import sys

    if sys.argv[1:2] == ["register"]:
        print(json.dumps(prediction_record(), indent=1))
        print(f"written to {write_predictions()}")
    elif sys.argv[1:2] == ["score"] and len(sys.argv) == 3:
        print(f"written to {write_seed_table(sys.argv[2], (0, 1, 2) + REPLICATION_SEEDS)}")
    else:
        sys.exit("usage: python -m revlens.lm.replication register | score RUNS_FOLDER")
