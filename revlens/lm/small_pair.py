"""Train the shipped small pair: a LLaDA-architecture MDM and a matched LLaMA-architecture ARM.

Both have the same size, tokenizer and training sentences (:mod:`revlens.lm.corpus`) and differ
only in what separates an MDM from an ARM: bidirectional attention with the masked-diffusion loss
(predict at the mask) versus causal attention with next-token loss. Both are built, trained (one step at a
time, :func:`revlens.objectives.make_loss_batch`) and saved by :mod:`revlens.lm.trainer`, as config.json +
safetensors + tokenizer in the public layouts, and loaded back through :class:`revlens.lm.HookedLM` like any
real checkpoint. This module holds the recipe: its configurations, the corpus's length buckets, the one-cycle
training loop, the switches and replicates, and their tables.

Regenerate with ``revlens small-pair`` (about 8 minutes per model on one CPU core: 4000 steps each).
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import torch

from revlens.atomic import write_json_atomic, write_text_atomic
from revlens.config import check_choice, load_json
from revlens.facts import DECODES, FactSet, model_decodes
from revlens.lm.corpus import build_tokenizer, entity_units, make_world, training_statements
from revlens.lm.trainer import OBJECTIVE, Bucket, PairConfig, new_model, save_model, train_model
from revlens.workers import in_order

SMALL_PAIR_DIR = Path(__file__).resolve().parents[2] / "data" / "small_pair"


SHIPPED_PAIR = PairConfig(n_layers=4, masking="entity", t_sampling="stratified", grad_clip=1.0, lr=5e-4, steps=4000,
                          arm_steps=4000)
"""The recipe of the shipped pair (``data/small_pair``): 4 layers, whole-entity masking, stratified t, clipping at
norm 1, a one-cycle schedule peaking at lr 5e-4, 4000 steps for the MDM and the same budget for the ARM of the same
shape (see the ``*_curve`` records in ``training.json``). The peak rate was chosen after runs at higher ones: at
2e-3 the same MDM, on a 24000-step schedule scored every 4000 steps, first answered 0.95 of the forward queries by
step 8000 or 12000. Decoded the way it was trained (``decode="parallel"``: a name is filled from the pass that sees
it wholly masked) its MDM answers the in-place queries at seeds 0, 1 and 2 and at least 0.98 of the forward ones
(see notebook 05). The trainer switches are measured on :data:`SWITCH_BASE` instead."""


def length_buckets(world: FactSet, tok) -> list[Bucket]:
    """The world's training sentences tokenised and grouped by length, so batches need no padding."""
    by_len: dict[int, list[tuple[list[int], list[int]]]] = defaultdict(list)
    for i, template in training_statements(world):
        fact = world.facts[i]
        ids = tok(world.sentence(i, template))["input_ids"]
        entities = [tok(e, add_special_tokens=False)["input_ids"] for e in (fact.a, fact.b)]
        by_len[len(ids)].append((ids, entity_units(ids, entities)))
    return [Bucket(torch.tensor([ids for ids, _ in v]), torch.tensor([u for _, u in v])) for _, v in sorted(by_len.items())]


def train_small_pair(out_dir: str | Path = SMALL_PAIR_DIR, pc: PairConfig = SHIPPED_PAIR,
                     models: tuple[str, ...] = ("llada", "llama"), curve_every: int = 0,
                     arm_curve_every: int | None = None, overwrite: bool = False, *,
                     rewriting_tables: bool = False) -> Path:
    """Train the pair (or only ``models``) and write ``out_dir/{llada,llama}`` (+ ``world.json``, ``training.json``).

    ``curve_every``: also score the model every that many steps (and at the end) and keep the accuracies in
    ``training.json`` as ``<model>_curve``: when did it memorise? ``arm_curve_every`` sets the ARM's interval
    (default: ``curve_every``). Training one model into a folder that holds the other model of the same
    configuration keeps that model's record.

    Checked before any training: ``out_dir`` must be new, empty or a pair folder (else refused unless
    ``overwrite``), and files that would then describe another pair (see :func:`stale_pair_files`) are refused
    unless ``overwrite`` (or ``rewriting_tables``, as :func:`regenerate` rewrites the tables), which removes them.
    Every file is written atomically, ``training.json`` (the configuration in training) before the models.
    """
    out = Path(out_dir)
    tok = build_tokenizer()
    world: FactSet = make_world(pc.n_facts, seed=pc.seed, wording=pc.wording)
    buckets = length_buckets(world, tok)
    record = {"config": asdict(pc), "n_sentences": int(sum(len(b.tokens) for b in buckets))}
    previous = pair_record(out, overwrite)
    if previous is not None and previous.get("config") == record["config"]:
        record = previous  # the other model of the same pair: keep its record
    stale = stale_pair_files(out, previous, record, models)
    if stale and not (overwrite or rewriting_tables):
        raise ValueError(f"{out} holds {', '.join(p.name for p in stale)}, which describe(s) a pair trained with "
                         f"another configuration or not finished; training {', '.join(models)} alone would leave "
                         "them beside the new model(s). Train into a new --out, or pass --overwrite to remove them")
    for path in stale:  # only the files and model folders this command writes
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    world.save(out / "world.json")
    write_json_atomic(out / "training.json", record)
    for name in models:
        objective = OBJECTIVE[name]
        model = new_model(name, pc, tok)
        curve: list[dict[str, float]] = []

        def checkpoint(step: int, losses: list[float]) -> None:
            save_model(model, out / name, tok)
            curve.append({"step": step, "loss": round(recent_loss(losses), 3)}
                         | pair_accuracy(out, (name,)))

        every = arm_curve_every if objective == "arm" and arm_curve_every is not None else curve_every
        losses = train_model(model, objective, buckets, tok.mask_token_id, pc, f"train {name} ({objective})",
                             every, checkpoint if every else None)
        save_model(model, out / name, tok)
        record[f"{name}_steps"] = pc.steps_for(objective)
        record[f"{name}_final_loss"] = recent_loss(losses)
        if curve:
            record[f"{name}_curve"] = curve
        write_json_atomic(out / "training.json", record)
    record_accuracy(out, models)
    return out


DERIVED_TABLES = ("switches.jsonl", "heads.jsonl", "replicate_seed*.json")
"""Files :func:`regenerate` writes beside the pair; ``heads.jsonl`` and the replicates describe the pair's recipe."""


def pair_record(out: Path, overwrite: bool = False) -> dict | None:
    """The ``training.json`` of the pair folder ``out``; None when ``out`` is new or empty. A file, or a non-empty
    folder without a pair's record, is refused (it is not this command's to write into) unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder; choose another --out")
    record = out / "training.json"
    content = load_json(record) if record.is_file() else None
    if isinstance(content, dict) and isinstance(content.get("config"), dict) and "n_sentences" in content:
        return content
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} is a non-empty folder that does not hold a small pair (no training.json of one); "
                         "refusing to write into it: choose a new or empty --out, or pass --overwrite")
    return None


def stale_pair_files(out: Path, previous: dict | None, record: dict, models: tuple[str, ...]) -> list[Path]:
    """Files of ``out`` that would describe another pair once ``models`` are trained with ``record``'s config: the
    other model's folder when it was trained with another configuration or has no finished record, and, when the
    configuration changes, the tables :func:`regenerate` derived from the old pair (training is seeded, so with the
    same configuration they still describe the retrained pair)."""
    if previous is None:
        return []
    changed = previous.get("config") != record["config"]
    others = [out / m for m in OBJECTIVE if m not in models and (out / m).exists()
              and (changed or f"{m}_steps" not in record)]
    tables = [p for pattern in DERIVED_TABLES for p in sorted(out.glob(pattern))] if changed else []
    return others + tables


def recent_loss(losses: list[float], window: int = 100) -> float:
    """Mean training loss over the last ``window`` steps (fewer at the start)."""
    return sum(losses[-window:]) / len(losses[-window:])


def pair_accuracy(folder: str | Path, models: tuple[str, ...] = ("llada", "llama")) -> dict[str, float]:
    """Accuracy of the pair in ``folder`` per model, direction and split (startswith rule), loaded from disk:
    keys "<model> <direction> <split>" with sequential decoding, and for the MDM also "..., parallel" with the
    whole answer filled in one step (see :data:`revlens.facts.DECODES`)."""
    from revlens.lm import HookedLM
    from revlens.lm.analysis import score_table

    folder = Path(folder)
    world = FactSet.load(folder / "world.json")
    out = {}
    for name in models:
        lm = HookedLM.from_pretrained(folder / name)
        for decode in model_decodes(lm):
            table = score_table(lm, world, decode=decode)
            suffix = "" if decode == "sequential" else f", {decode}"
            for (direction, split), acc in table.groupby(["direction", "split"]).correct.mean().items():
                out[f"{name} {direction} {split}{suffix}"] = round(float(acc), 4)
    return out


def record_accuracy(folder: str | Path, models: tuple[str, ...] = ("llada", "llama")) -> None:
    """Add the reloaded pair's accuracies to ``training.json`` (the shipped numbers tests check)."""
    path = Path(folder) / "training.json"
    record = json.loads(path.read_text())
    record["accuracy"] = record.get("accuracy", {}) | pair_accuracy(folder, models)
    write_json_atomic(path, record)


SWITCHES: dict[str, dict[str, str]] = {
    "token masking, reworded reverse": {},  # SWITCH_BASE
    "entity masking, reworded reverse": {"masking": "entity"},
    "token masking, same-words reverse": {"wording": "same_words"},
}
"""Trainer switches measured against the token-masking MDM: whole-entity masking, and reverse templates that keep
the forward sentence's words (each changes one thing; the facts, split and forward sentences are the same)."""

SWITCH_BASE = PairConfig(arm_steps=4000)
"""The recipe the switches change one thing of: 2 layers, token masking, 8000 MDM steps; the ARMs get 4000 steps,
at which every seed's ARM answers every trained direction (accuracy 1; the 4-layer ARM of the shipped pair gets
there by step 3000 of 8000)."""

MDM_ONLY = ("masking", "mask_eps", "t_sampling")
"""PairConfig fields the ARM's next-token training does not read: switches of these share one ARM."""

WORDING_LABELS = {"reworded": "reworded reverse", "same_words": "same-words reverse"}


def arm_switches(switches: dict[str, dict[str, str]] = SWITCHES) -> dict[str, dict[str, str]]:
    """The ARM runs that go with ``switches``: one per distinct change the ARM reads (here the wording), named
    "ARM, <wording> reverse", so the switch table compares MDM and ARM trained on the same sentences."""
    out = {}
    for change in switches.values():
        arm_change = {k: v for k, v in change.items() if k not in MDM_ONLY}
        out[f"ARM, {WORDING_LABELS[arm_change.get('wording', PairConfig.wording)]}"] = arm_change
    return out


def pair_scores(folder: str | Path, models: tuple[str, ...] = ("llada", "llama")) -> pd.DataFrame:
    """Every fact of ``folder``'s world scored by its models (the MDM under both decodings, see
    :func:`revlens.facts.model_decodes`): model, decode, fact, person, direction, split, correct, logp, and on reverse queries
    of forward-only facts ``foil_logp`` (another person's name in the same prompt, scored the same way, see
    :func:`revlens.lm.analysis.foil_logp`; NaN elsewhere)."""
    from revlens.lm import HookedLM
    from revlens.lm.analysis import foil_logp, score_table

    folder = Path(folder)
    world = FactSet.load(folder / "world.json")
    tables = []
    for name in models:
        lm = HookedLM.from_pretrained(folder / name)
        for decode in model_decodes(lm):
            table = score_table(lm, world, decode=decode).assign(model=name, decode=decode)
            foils = foil_logp(lm, world, world.subset(split="forward_only"), decode=decode).set_index("fact")["foil logp"]
            table["foil_logp"] = table.fact.map(foils).where(table.direction == "reverse")
            table["person"] = [world.facts[i].a for i in table.fact]
            tables.append(table)
    columns = ["model", "decode", "fact", "person", "direction", "split", "correct", "logp", "foil_logp"]
    return pd.concat(tables, ignore_index=True)[columns].round({"logp": 4, "foil_logp": 4})


def switch_folder(root: str | Path, switch: str, seed: int) -> Path:
    """Where :func:`train_switches` keeps the MDM of one switch and seed."""
    return Path(root) / switch.replace(", ", "_").replace(" ", "-") / f"seed{seed}"


def train_switches(root: str | Path, seeds: tuple[int, ...], base: PairConfig = SWITCH_BASE,
                   switches: dict[str, dict[str, str]] = SWITCHES, arm: bool = True, jobs: int = 1) -> pd.DataFrame:
    """Train the MDM of every switch x seed under ``root/<switch>/seed<k>`` (and with ``arm`` the ARMs of
    :func:`arm_switches`), reusing finished runs; return one row per switch, seed, fact and direction (see
    :func:`pair_scores`). ``jobs > 1`` trains that many runs at once in worker processes (one run's step is
    compute-bound, so separate processes, not a batched step, are what speeds several runs up; see
    ``bench/small_pair_batching.py``)."""
    labels, tasks = switch_tasks(root, seeds, base, switches, arm)
    tables = in_order(_switch_run, tasks, jobs, cost=lambda task: task[1].steps_for(OBJECTIVE[task[2]]) * task[1].n_layers)
    return pd.concat([table.assign(switch=name, seed=seed) for (name, seed), table in zip(labels, tables)], ignore_index=True)


def switch_tasks(root: str | Path, seeds: tuple[int, ...], base: PairConfig = SWITCH_BASE,
                 switches: dict[str, dict[str, str]] = SWITCHES, arm: bool = True
                 ) -> tuple[list[tuple[str, int]], list[tuple[Path, PairConfig, str]]]:
    """(switch, seed) labels and (folder, config, family) runs of :func:`train_switches`."""
    runs = [(name, change, "llada") for name, change in switches.items()]
    if arm:
        runs += [(name, change, "llama") for name, change in arm_switches(switches).items()]
    tasks = [(switch_folder(root, name, seed), replace(base, seed=seed, **change), family)
             for name, change, family in runs for seed in seeds]
    return [(name, seed) for name, _, _ in runs for seed in seeds], tasks


def finished_run(folder: Path, pc: PairConfig, family: str) -> bool:
    """Whether ``folder`` holds ``family`` trained with ``pc`` to the end, to be reused instead of retrained (an
    unfinished one is retrained from the start: training is seeded, so the result is the same). A model trained
    with another configuration (say another learning rate or step count, in a runs folder kept from an earlier
    recipe) is an error naming the folder and the fields that differ, never a stale result returned as this one."""
    if not (folder / family / "model.safetensors").exists():
        return False
    record = folder / "training.json"
    content = load_json(record) if record.exists() else {}
    found = content.get("config", {}) if isinstance(content, dict) else {}
    wanted = asdict(pc)
    differing = sorted(key for key in wanted if found.get(key) != wanted[key])
    if differing:
        raise ValueError(f"{folder} holds a {family} model trained with another configuration (differs in "
                         f"{', '.join(differing)}); delete that folder or pass another --runs folder")
    return f"{family}_steps" in content


def _switch_run(folder: Path, pc: PairConfig, family: str) -> pd.DataFrame:
    """Worker: train ``family`` with ``pc`` into ``folder`` unless it is there, and score it."""
    if not finished_run(folder, pc, family):
        train_small_pair(folder, pc, (family,))
    return pair_scores(folder, (family,))


def switch_heads(root: str | Path, seeds: tuple[int, ...], switches: tuple[str, ...] = tuple(SWITCHES)) -> pd.DataFrame:
    """:func:`revlens.lm.analysis.mdm_head_table` of every trained switch x seed MDM under ``root``, one row
    per switch, seed, layer and head: are the heads that carry the patched answer the route-sharing ones?"""
    return pd.concat([head_rows(switch_folder(root, name, seed), name, seed) for name in switches for seed in seeds],
                     ignore_index=True)


def head_rows(folder: str | Path, label: str, seed: int) -> pd.DataFrame:
    """:func:`revlens.lm.analysis.mdm_head_table` of the MDM in ``folder``, one row per layer and head, labelled."""
    from revlens.lm import HookedLM
    from revlens.lm.analysis import mdm_head_table

    folder = Path(folder)
    heads = mdm_head_table(HookedLM.from_pretrained(folder / "llada"), FactSet.load(folder / "world.json"))
    return heads.round(4).reset_index().assign(switch=label, seed=seed)


RECIPE_LABEL = "shipped recipe (4 layers)"
"""How the shipped recipe's MDMs (the pair's and its replicates) are labelled in ``heads.jsonl``."""


def replicate_folder(root: str | Path, seed: int) -> Path:
    """Where :func:`regenerate` trains the shipped recipe's MDM at another seed."""
    return Path(root) / "shipped-recipe" / f"seed{seed}"


def _replicate_run(folder: Path, pc: PairConfig, curve_every: int) -> None:
    """Worker: train the MDM of ``pc`` into ``folder`` (with its accuracy curve) unless it is there."""
    if not finished_run(folder, pc, "llada"):
        train_small_pair(folder, pc, ("llada",), curve_every)


def regenerate(out_dir: str | Path = SMALL_PAIR_DIR, runs: str | Path = "runs/small_pair_switches",
               seeds: tuple[int, ...] = (0,), pc: PairConfig | None = None,
               switch_base: PairConfig = SWITCH_BASE, jobs: int = 1, curve_every: int = 0,
               arm_curve_every: int | None = None, overwrite: bool = False) -> Path:
    """Everything notebook 05 ships: the pair trained with ``pc`` in ``out_dir``; the MDM of the same recipe at the
    other ``seeds`` (under ``runs``, their training records copied to ``out_dir/replicate_seed<k>.json``);
    ``out_dir/switches.jsonl`` (:func:`pair_scores` of the MDMs of every switch and their ARMs, on ``switch_base``
    with each seed, under ``runs``) and ``out_dir/heads.jsonl`` (the per-head route and patching table of the
    switch MDMs and of the recipe's MDMs). ``pc`` defaults to :data:`SHIPPED_PAIR`; ``jobs`` as in
    :func:`train_switches`, the curve intervals and ``overwrite`` as in :func:`train_small_pair`. Every runs folder
    is checked against its recipe before anything trains; the old tables are removed before the pair retrains, so a
    kill leaves no table describing another pair."""
    pc = pc or SHIPPED_PAIR
    replicates = tuple(seed for seed in seeds if seed != pc.seed)
    replicate_tasks = [(replicate_folder(runs, k), replace(pc, seed=k), curve_every) for k in replicates]
    for folder, run_pc, family in [(f, c, "llada") for f, c, _ in replicate_tasks] + switch_tasks(runs, seeds, switch_base)[1]:
        finished_run(folder, run_pc, family)  # a runs folder of another recipe is an error now, before any training
    out = train_small_pair(out_dir, pc, curve_every=curve_every, arm_curve_every=arm_curve_every, overwrite=overwrite,
                           rewriting_tables=True)
    for _ in in_order(_replicate_run, replicate_tasks, jobs):
        pass
    for k in replicates:
        write_text_atomic(out / f"replicate_seed{k}.json", (replicate_folder(runs, k) / "training.json").read_text())
    table = train_switches(runs, seeds, switch_base, jobs=jobs)
    write_text_atomic(out / "switches.jsonl", table.to_json(orient="records", lines=True))
    recipe = [head_rows(out, RECIPE_LABEL, pc.seed)] + [head_rows(replicate_folder(runs, k), RECIPE_LABEL, k) for k in replicates]
    heads = pd.concat([switch_heads(runs, seeds), *recipe], ignore_index=True)
    write_text_atomic(out / "heads.jsonl", heads.to_json(orient="records", lines=True))
    return out


def switch_table(scores: pd.DataFrame, decode: str = "sequential") -> pd.DataFrame:
    """One row per switch: seeds, accuracy per query on forward-only facts (+ reverse on control facts), the
    reverse gold log-probability and, where ``foil_logp`` is scored, gold minus foil (nats), each as "mean ± 95%
    half-width": over seeds when there are several, else over persons (each person's queries averaged first: a
    person is asked through two templates that share gold and foil). Rows are those scored with ``decode`` (see
    :func:`pair_scores`); a model with no rows under ``decode`` (an ARM, for ``parallel``) keeps its sequential ones."""
    from revlens.stats import mean_ci

    check_choice("decode", decode, DECODES)
    if "decode" in scores:
        decoded = set(scores.model[scores.decode == decode])
        scores = scores[(scores.decode == decode) | (~scores.model.isin(decoded) & (scores.decode == "sequential"))]
    elif decode != "sequential":
        raise ValueError("switch_table: these scores have no 'decode' column (scored before decodings were "
                         "recorded), so they are sequential only; rescore them with pair_scores")

    cells = {"forward acc": ("forward", "forward_only", "correct"), "in-place acc": ("inplace", "forward_only", "correct"),
             "reverse acc": ("reverse", "forward_only", "correct"), "reverse acc, control facts": ("reverse", "control", "correct"),
             "reverse gold logp, forward-only": ("reverse", "forward_only", "logp"),
             "reverse gold - foil (nats), forward-only": ("reverse", "forward_only", "gold - foil")}
    scores = scores.assign(**{"gold - foil": scores.logp - scores.get("foil_logp", float("nan"))})
    out = {}
    for switch, rows in scores.groupby("switch", sort=False):
        seeds = sorted(rows.seed.unique())
        row: dict[str, object] = {"seeds": len(seeds), "interval over": "seeds" if len(seeds) > 1 else "persons"}
        for name, (direction, split, metric) in cells.items():
            sel = rows[(rows.direction == direction) & (rows.split == split)]
            values = sel.groupby("seed" if len(seeds) > 1 else "person")[metric].mean().dropna()
            mean, half = mean_ci(values)
            row[name] = "n/a" if pd.isna(mean) else f"{mean:.2f} ± {half:.2f}"
        out[switch] = row
    return pd.DataFrame(out).T
