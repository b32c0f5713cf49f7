"""Grid sweeps over named settings: one batched multi-seed run per setting, one tidy table.

A sweep file (JSON) names the world, the training settings, the seeds and the settings::

    {"name": "ablations",
     "world": {"n_facts": 200, "n_control": 40, "seed": 0},
     "train": {"steps": 2000, "batch_size": 256, "lr": 0.003, "log_every": 2000},
     "seeds": [0, 1, 2, 3, 4],
     "settings": [{"name": "MDM", "objective": "mdm", "group": "baseline",
                   "model": {"attention_dir": "bidirectional"}}, ...]}

``run_sweep`` writes one JSON line per (setting, seed) -- the setting, its group and overrides, the
seed and every metric -- appending as each setting finishes, so an interrupted sweep resumes where
it stopped (a setting whose rows are all present is not re-run).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from revlens.evaluation import evaluate_under_control
from revlens.experiments import Setting, train_setting
from revlens.training import TrainConfig, TrainRun, train
from revlens.world import EVAL_SETS, ReversalWorld

SNAPSHOT_KEYS = (
    "route_score_corr",
    "route_weight_rev",
    "route_weight_rev_max_head",
    "cos_all",
    "cos_storage",
    "cos_route",
    "cos_embedding",
    "fact_cos_all_mean",
)
"""Logged quantities recorded both at initialisation (``*_init``) and at the end (``*_final``)."""


@dataclass(frozen=True)
class SweepSpec:
    name: str
    world: ReversalWorld
    train: TrainConfig
    seeds: tuple[int, ...]
    settings: tuple[tuple[Setting, str], ...]  # (setting, group)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SweepSpec":
        missing = {"name", "seeds", "settings"} - set(data)
        if missing:
            raise ValueError(f"sweep file lacks {', '.join(sorted(missing))}")
        settings = []
        for entry in data["settings"]:
            unknown = set(entry) - {"name", "objective", "model", "group", "description"}
            if unknown:
                raise ValueError(f"setting {entry.get('name')!r} has unknown keys {sorted(unknown)}")
            setting = Setting(entry["name"], entry["objective"], dict(entry.get("model", {})), entry.get("description", ""))
            settings.append((setting, entry.get("group", "")))
        names = [s.name for s, _ in settings]
        if len(set(names)) != len(names):
            raise ValueError(f"setting names must be unique, got duplicates in {names}")
        return cls(
            data["name"],
            ReversalWorld.generate(**data.get("world", {})),
            TrainConfig(**data.get("train", {})),
            tuple(data["seeds"]),
            tuple(settings),
        )

    @classmethod
    def load(cls, path: str | Path) -> "SweepSpec":
        return cls.from_dict(json.loads(Path(path).read_text()))


DIAGNOSED_SETS = ("inplace", "reverse")
DIAGNOSTICS = ("acc_in_type", "argmax_in_type", "margin", "rank")
"""Beyond accuracy, rows carry these answer metrics (:func:`revlens.evaluation.answer_metrics`) and,
for the same sets, every answer metric under a uniform attention pattern (suffix ``_uniform``)."""


def run_rows(setting: Setting, group: str, runs: list[TrainRun], world: ReversalWorld) -> Iterator[dict[str, Any]]:
    """Tidy rows (one per seed) from a setting's trained runs on ``world``."""
    for run in runs:
        first, last = run.history[0], run.history[-1]
        row: dict[str, Any] = {
            "setting": setting.name,
            "group": group,
            "objective": setting.objective,
            "model": json.dumps(dict(setting.model), sort_keys=True),
            "seed": run.seed,
        }
        row.update({s: last[f"{s}_acc"] for s in EVAL_SETS})
        row.update({f"{s}_{m}": last[f"{s}_{m}"] for s in DIAGNOSED_SETS for m in DIAGNOSTICS})
        row.update(evaluate_under_control(run.model, world, setting.objective, "uniform", DIAGNOSED_SETS))
        row["chance"] = last["chance"]
        for key in SNAPSHOT_KEYS:
            row[f"{key}_init"], row[f"{key}_final"] = first.get(key, math.nan), last.get(key, math.nan)
        yield {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _train_rows(setting: Setting, group: str, spec: SweepSpec, threads: int) -> list[dict[str, Any]]:
    """Worker: train one setting (all seeds, batched) with ``threads`` intra-op threads; its rows."""
    import torch

    torch.set_num_threads(threads)
    runs = train_setting(setting, spec.world, spec.seeds, spec.train, progress=False)
    return list(run_rows(setting, group, runs, spec.world))


def step_seconds(setting: Setting, spec: SweepSpec, repeats: int = 3) -> float:
    """Measured wall time of one batched training step of ``setting`` (all seeds): a cost estimate."""
    import time

    train_cfg = dataclasses.replace(spec.train, objective=setting.objective, steps=repeats, log_every=repeats)
    start = time.perf_counter()
    train(setting.model_cfg(spec.world), spec.world, train_cfg, spec.seeds, progress=False)
    return (time.perf_counter() - start) / repeats


def run_sweep(spec: SweepSpec, out: str | Path, progress: bool = True, jobs: int = 1) -> Path:
    """Run every setting not yet complete in ``out`` (a .jsonl file) and append its rows.

    ``jobs > 1`` trains that many settings at once in worker processes, splitting the machine's
    threads between them: the tiny per-setting steps use two single-threaded processes better than
    one two-threaded one (results are identical; seeded CPU kernels gave bit-identical weights at 1
    and 2 threads here). Rows are appended in the sweep file's order, each setting as soon as all
    settings before it are written, so an interrupted sweep still resumes where it stopped.
    """
    import torch

    if jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["setting"], r["seed"]) for r in read_rows(out)}
    todo = [(s, g) for s, g in spec.settings if not all((s.name, seed) in done for seed in spec.seeds)]

    def write(rows: list[dict[str, Any]]) -> None:
        with out.open("a") as f:
            for row in rows:
                if (row["setting"], row["seed"]) not in done:
                    f.write(json.dumps(row) + "\n")

    bar = tqdm(total=len(todo), desc=f"sweep {spec.name}", unit="setting", disable=not progress)
    threads = max(1, torch.get_num_threads() // jobs)
    if jobs == 1:
        for setting, group in todo:
            write(_train_rows(setting, group, spec, threads))
            bar.update()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        cost = {setting.name: step_seconds(setting, spec) for setting, _ in todo}
        longest_first = sorted(todo, key=lambda sg: -cost[sg[0].name])
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            submitted = {s.name: pool.submit(_train_rows, s, g, spec, threads) for s, g in longest_first}
            futures = [submitted[setting.name] for setting, _ in todo]
            for future in futures:  # in sweep order; the others keep training meanwhile
                write(future.result())
                bar.update()
    bar.close()
    return out
