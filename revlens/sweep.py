"""Grid sweeps over named settings: one batched multi-seed run per setting, one tidy table.

A sweep file (JSON) names the world, the training settings, the seeds and the settings::

    {"name": "ablations",
     "world": {"n_facts": 200, "n_control": 40, "seed": 0},
     "train": {"steps": 2000, "batch_size": 256, "lr": 0.003, "log_every": 2000},
     "seeds": [0, 1, 2, 3, 4],
     "settings": [{"name": "MDM", "objective": "mdm", "group": "baseline",
                   "model": {"attention_dir": "bidirectional"}}, ...]}

``run_sweep`` writes one JSON line per (setting, seed) -- the setting, its group and overrides, the
seed, every metric and its ``provenance`` -- adding each setting's rows as soon as it finishes, so
an interrupted sweep resumes where it stopped (a setting whose rows are all present is not re-run).

Resuming is safe against a changed sweep file or library. ``provenance`` holds ``config``, a hash of
everything that determines a row's numbers (the setting's full model config, the training config,
the world), and ``revlens``, the library fingerprint (:func:`revlens.experiments.code_fingerprint`).
A resume keeps only rows whose provenance equals what the current sweep file and library would
produce; any other row (a different config or library, a setting or seed no longer in the sweep
file, a duplicate, or a row from a table written before rows carried provenance) is refused with an
error naming it, or dropped and retrained with ``redo=True`` (``revlens sweep --redo``).

Crash safety: the table is only ever replaced whole (written to a temporary file, flushed, fsynced,
renamed over the old one), so a crash leaves either the old table or the new one. A table whose last
line was torn by another writer loses only that line, with a warning naming the file and line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from revlens.config import check_choice, check_file_name, check_seeds, load_json
from revlens.evaluation import evaluate_under_control
from revlens.experiments import Setting, code_fingerprint, train_setting
from revlens.objectives import OBJECTIVES
from revlens.training import TrainConfig, TrainRun, init_noise, train
from revlens.workers import check_jobs, in_order
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

SPEC_KEYS = frozenset({"name", "world", "train", "seeds", "settings", "description"})
SETTING_KEYS = frozenset({"name", "objective", "model", "group", "description"})


class SweepWarning(UserWarning):
    """A sweep table needed repair: a torn last line dropped, or stale rows dropped for retraining."""


@dataclass(frozen=True)
class SweepSpec:
    name: str
    world: ReversalWorld
    train: TrainConfig
    seeds: tuple[int, ...]
    settings: tuple[tuple[Setting, str], ...]  # (setting, group)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SweepSpec":
        """Build a spec from a sweep file's content; every mistake is a ValueError naming the field."""
        if not isinstance(data, dict):
            raise ValueError(f"a sweep file holds a JSON object, got {type(data).__name__}")
        missing = {"name", "seeds", "settings"} - set(data)
        if missing:
            raise ValueError(f"sweep file lacks {', '.join(sorted(missing))}")
        unknown = sorted(set(data) - SPEC_KEYS)
        if unknown:
            raise ValueError(f"sweep file has unknown top-level keys {unknown}; expected some of {sorted(SPEC_KEYS)}")
        name = check_file_name("sweep name", data["name"])
        seeds = check_seeds(data["seeds"])
        if not isinstance(data["settings"], list) or not data["settings"]:
            raise ValueError(f"'settings' must be a non-empty list of settings, got {data['settings']!r}")
        settings = [_setting_from_dict(i, entry) for i, entry in enumerate(data["settings"])]
        names = [s.name for s, _ in settings]
        if len(set(names)) != len(names):
            raise ValueError(f"setting names must be unique, got duplicates in {names}")
        for section in ("world", "train"):
            if not isinstance(data.get(section, {}), dict):
                raise ValueError(f"'{section}' must be a JSON object, got {data[section]!r}")
        try:
            world = ReversalWorld.generate(**data.get("world", {}))
            train_cfg = TrainConfig(**data.get("train", {}))
        except TypeError as err:  # an unknown keyword
            raise ValueError(f"sweep file: {err}") from None
        for setting, _ in settings:  # a bad model override fails now, not after hours of other settings
            try:
                setting.model_cfg(world)
            except (TypeError, ValueError) as err:
                raise ValueError(f"setting {setting.name!r}: bad model override: {err}") from None
        return cls(name, world, train_cfg, seeds, tuple(settings))

    @classmethod
    def load(cls, path: str | Path) -> "SweepSpec":
        try:
            return cls.from_dict(load_json(path))
        except ValueError as err:
            raise ValueError(err if str(err).startswith(str(path)) else f"{path}: {err}") from None

    def provenance(self, setting: Setting) -> dict[str, str]:
        """What produces ``setting``'s rows: a hash of its model, training and world configs, and the library."""
        train_cfg = dataclasses.replace(self.train, objective=setting.objective)
        payload = {"model": setting.model_cfg(self.world).to_dict(), "train": train_cfg.to_dict(),
                   "world": self.world.to_dict(), "init_noise": init_noise()}
        config = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
        return {"config": config, "revlens": code_fingerprint()}


def _setting_from_dict(index: int, entry: Any) -> tuple[Setting, str]:
    """One entry of a sweep file's ``settings`` list, checked; returns (setting, group)."""
    if not isinstance(entry, dict):
        raise ValueError(f"settings[{index}] must be a JSON object, got {entry!r}")
    label = f"setting {entry['name']!r}" if "name" in entry else f"settings[{index}]"
    unknown = set(entry) - SETTING_KEYS
    if unknown:
        raise ValueError(f"{label} has unknown keys {sorted(unknown)}")
    for key in ("name", "objective"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise ValueError(f"{label} needs a non-empty string {key!r}, got {entry.get(key)!r}")
    if not isinstance(entry.get("model", {}), dict):
        raise ValueError(f"{label}: 'model' must be a JSON object, got {entry['model']!r}")
    check_choice("objective", entry["objective"], OBJECTIVES)
    setting = Setting(entry["name"], entry["objective"], dict(entry.get("model", {})), str(entry.get("description", "")))
    return setting, str(entry.get("group", ""))


DIAGNOSED_SETS = ("inplace", "reverse")
DIAGNOSTICS = ("acc_in_type", "argmax_in_type", "margin", "rank")
"""Beyond accuracy, rows carry these answer metrics (:func:`revlens.evaluation.answer_metrics`) and,
for the same sets, every answer metric under a uniform attention pattern (suffix ``_uniform``)."""


def run_rows(
    setting: Setting,
    group: str,
    runs: list[TrainRun],
    world: ReversalWorld,
    provenance: dict[str, str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Tidy rows (one per seed) from a setting's trained runs on ``world``, ending with ``provenance``
    when given."""
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
        if provenance is not None:
            row["provenance"] = dict(provenance)
        yield {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def _read_table(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """Rows of a table and whether a torn last line was dropped (see :func:`read_rows`)."""
    if not path.is_file():
        return [], False
    text = path.read_text()
    lines = text.split("\n")
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    rows, torn = [], False
    for i, line in numbered:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(lines) and i == numbered[-1][0]:  # the last line, without its newline: an append cut short
                warnings.warn(f"{path}, line {i}: incomplete last row dropped ({err.msg}); "
                              "a resume retrains the setting it belonged to", SweepWarning, stacklevel=3)
                torn = True
                continue
            raise ValueError(f"{path}, line {i}: not a JSON row ({err.msg}, column {err.colno})") from None
        if not isinstance(row, dict) or not isinstance(row.get("setting"), str) or type(row.get("seed")) is not int:
            raise ValueError(f"{path}, line {i}: a row must be a JSON object with a string 'setting' and an integer 'seed'")
        rows.append(row)
    return rows, torn


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a sweep table (empty if the file does not exist).

    A line that is not a JSON row is an error naming the file and line, except an unterminated last
    line -- what a crash in the middle of an append leaves -- which is dropped with a warning.
    """
    return _read_table(Path(path))[0]


def write_rows(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Replace the table at ``path`` by ``rows`` atomically: temporary file, fsync, rename, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def stale_rows(rows: Sequence[dict[str, Any]], spec: "SweepSpec") -> dict[int, str]:
    """Rows (by index) that a resume of ``spec`` must not keep, each with the reason."""
    expected = {s.name: spec.provenance(s) for s, _ in spec.settings}
    seen: set[tuple[str, int]] = set()
    stale = {}
    for i, row in enumerate(rows):
        key, have = (row["setting"], row["seed"]), row.get("provenance")
        want = expected.get(row["setting"])
        if want is None:
            stale[i] = "setting not in the sweep file"
        elif row["seed"] not in spec.seeds:
            stale[i] = "seed not in the sweep file"
        elif key in seen:
            stale[i] = "duplicate row"
        elif not isinstance(have, dict):
            stale[i] = "unknown provenance (row written before rows carried one)"
        elif have.get("config") != want["config"]:
            stale[i] = "produced by a different model/train/world config"
        elif have.get("revlens") != want["revlens"]:
            stale[i] = f"produced by a different revlens version ({have.get('revlens')}, this is {want['revlens']})"
        seen.add(key)
    return stale


def _describe(rows: Sequence[dict[str, Any]], stale: dict[int, str]) -> str:
    """"setting seeds [..]: reason" per (setting, reason), in table order."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, reason in stale.items():
        groups.setdefault((rows[i]["setting"], reason), []).append(rows[i]["seed"])
    return "; ".join(f"{name} seeds {seeds}: {reason}" for (name, reason), seeds in groups.items())


def _train_rows(setting: Setting, group: str, spec: SweepSpec) -> list[dict[str, Any]]:
    """Worker: train one setting (all seeds, batched); its rows."""
    runs = train_setting(setting, spec.world, spec.seeds, spec.train, progress=False)
    return list(run_rows(setting, group, runs, spec.world, spec.provenance(setting)))


def step_seconds(setting: Setting, spec: SweepSpec, repeats: int = 3) -> float:
    """Measured wall time of one batched training step of ``setting`` (all seeds): a cost estimate."""
    import time

    train_cfg = dataclasses.replace(spec.train, objective=setting.objective, steps=repeats, log_every=repeats)
    start = time.perf_counter()
    train(setting.model_cfg(spec.world), spec.world, train_cfg, spec.seeds, progress=False)
    return (time.perf_counter() - start) / repeats


def run_sweep(spec: SweepSpec, out: str | Path, progress: bool = True, jobs: int = 1, redo: bool = False) -> Path:
    """Run every setting not yet complete in ``out`` (a .jsonl file) and add its rows.

    Rows already in ``out`` are kept only if their provenance matches ``spec`` and this library
    (see the module docstring); others make this a ValueError naming them, or with ``redo`` are
    dropped (with a :class:`SweepWarning` naming them) and their settings retrained.

    ``jobs > 1`` trains that many settings at once in worker processes, splitting the machine's
    threads between them: the tiny per-setting steps use two single-threaded processes better than
    one two-threaded one (results are identical; seeded CPU kernels gave bit-identical weights at 1
    and 2 threads here). Rows are written in the sweep file's order, each setting as soon as all
    settings before it are written, so an interrupted sweep still resumes where it stopped. Workers
    exit when this process dies.
    """
    check_jobs(jobs)
    out = Path(out)
    if out.exists() and not out.is_file():
        raise ValueError(f"{out} exists and is not a file")
    out.parent.mkdir(parents=True, exist_ok=True)
    table, torn = _read_table(out)
    stale = stale_rows(table, spec)
    if stale and not redo:
        raise ValueError(f"{out}: {len(stale)} row(s) do not match the sweep file {spec.name!r} and this revlens: "
                         f"{_describe(table, stale)}. Rerun with --redo to drop and retrain them, or write to a new --out.")
    if stale:
        warnings.warn(f"{out}: dropping {len(stale)} row(s) to retrain: {_describe(table, stale)}", SweepWarning, stacklevel=2)
    table = [row for i, row in enumerate(table) if i not in stale]
    if stale or torn:
        write_rows(out, table)
    done = {(r["setting"], r["seed"]) for r in table}
    todo = [(s, g) for s, g in spec.settings if not all((s.name, seed) in done for seed in spec.seeds)]

    def write(rows: list[dict[str, Any]]) -> None:
        table.extend(row for row in rows if (row["setting"], row["seed"]) not in done)
        write_rows(out, table)

    bar = tqdm(total=len(todo), desc=f"sweep {spec.name}", unit="setting", disable=not progress)
    cost = {setting.name: step_seconds(setting, spec) for setting, _ in todo} if jobs > 1 and len(todo) > 1 else {}
    tasks = [(setting, group, spec) for setting, group in todo]
    for rows in in_order(_train_rows, tasks, jobs, cost=lambda task: cost[task[0].name]):
        write(rows)
        bar.update()
    bar.close()
    return out
