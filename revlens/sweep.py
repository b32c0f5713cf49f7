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
the world), and ``revlens``, the library fingerprint (:func:`revlens.run_cache.code_fingerprint`).
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
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from tqdm import tqdm

from revlens.atomic import write_text_atomic
from revlens.config import check_choice, check_file_name, check_seeds, load_json
from revlens.evaluation import evaluate_under_control
from revlens.experiments import Setting, train_setting
from revlens.objectives import OBJECTIVES
from revlens.run_cache import code_fingerprint
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

    key_fields: ClassVar[tuple[str, ...]] = ("setting", "seed")

    def config(self, setting: Setting) -> str:
        """Hash of what determines ``setting``'s numbers: its model, training and world configs."""
        train_cfg = dataclasses.replace(self.train, objective=setting.objective)
        return config_hash({"model": setting.model_cfg(self.world).to_dict(), "train": train_cfg.to_dict(),
                            "world": self.world.to_dict(), "init_noise": init_noise()})

    def provenance(self, setting: Setting) -> dict[str, str]:
        """What produces ``setting``'s rows: :meth:`config` and the library fingerprint."""
        return {"config": self.config(setting), "revlens": code_fingerprint()}

    def planned(self) -> list[Planned]:
        return [Planned((setting.name, seed), self.config(setting), {"group": group})
                for setting, group in self.settings for seed in self.seeds]

    def tasks(self, todo: Sequence[Planned]) -> list[tuple[Any, ...]]:
        """One task per setting with a row to do: the setting trains all its seeds at once."""
        missing = {p.key[0] for p in todo}
        return [(setting, group, self) for setting, group in self.settings if setting.name in missing]

    def cost(self, task: tuple[Any, ...]) -> float:
        return step_seconds(task[0], self)

    @property
    def worker(self) -> Callable[..., list[dict[str, Any]]]:
        return _train_rows


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
        row.update({f"{s}_acc": last[f"{s}_acc"] for s in EVAL_SETS})
        row.update({f"{s}_{m}": last[f"{s}_{m}"] for s in DIAGNOSED_SETS for m in DIAGNOSTICS})
        row.update(evaluate_under_control(run.model, world, setting.objective, "uniform", DIAGNOSED_SETS))
        row["chance"] = last["chance"]
        for key in SNAPSHOT_KEYS:
            row[f"{key}_init"], row[f"{key}_final"] = first.get(key, math.nan), last.get(key, math.nan)
        if provenance is not None:
            row["provenance"] = dict(provenance)
        yield {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def _read_table(path: Path, key_fields: Sequence[str] = ("setting", "seed")) -> tuple[list[dict[str, Any]], bool]:
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
                              "a resume retrains the models it belonged to", SweepWarning, stacklevel=3)
                torn = True
                continue
            raise ValueError(f"{path}, line {i}: not a JSON row ({err.msg}, column {err.colno})") from None
        if not isinstance(row, dict) or any(field not in row for field in key_fields):
            raise ValueError(f"{path}, line {i}: a row must be a JSON object with the fields {', '.join(key_fields)}")
        rows.append(row)
    return rows, torn


def read_rows(path: str | Path, key_fields: Sequence[str] = ("setting", "seed")) -> list[dict[str, Any]]:
    """The rows of a sweep table (empty if the file does not exist).

    A line that is not a JSON row (an object holding ``key_fields``) is an error naming the file and
    line, except an unterminated last line -- what a crash in the middle of an append leaves -- which
    is dropped with a warning.
    """
    return _read_table(Path(path), key_fields)[0]


def write_rows(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Replace the table at ``path`` by ``rows`` atomically: temporary file, fsync, rename, fsync the folder."""
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def config_hash(payload: Any) -> str:
    """Short hash of a JSON payload: what determines a row's numbers (``provenance["config"]``)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


RowKey = tuple[Any, ...]


@dataclass(frozen=True)
class Planned:
    """A row a sweep file asks for: its key, the hash of what determines its numbers, and its labels
    (descriptive fields such as ``group`` that a sweep file may rename without changing any number)."""

    key: RowKey
    config: str
    labels: dict[str, Any] = dataclasses.field(default_factory=dict)


class SweepPlan(Protocol):
    """What :func:`run_table` needs of a sweep family (ablation sweeps: :class:`SweepSpec`; routing sweeps:
    :class:`revlens.routing.RoutingSweepSpec`)."""

    name: str
    key_fields: tuple[str, ...]
    """Row fields that identify a row (one model), e.g. ``("setting", "seed")``."""
    def planned(self) -> list[Planned]:
        """Every row of the sweep, in the sweep file's order."""

    def tasks(self, todo: Sequence[Planned]) -> list[tuple[Any, ...]]:
        """Work units (arguments of :meth:`worker`) that produce at least the rows ``todo``, in file order."""

    def cost(self, task: tuple[Any, ...]) -> float:
        """Relative training cost of a task (longest first when training in worker processes)."""

    @property
    def worker(self) -> Callable[..., list[dict[str, Any]]]:
        """A module-level function (so worker processes can unpickle it): ``worker(*task)`` trains one task
        and returns its rows, without provenance (:func:`run_table` adds it)."""


def stale_rows(rows: Sequence[dict[str, Any]], plan: SweepPlan) -> dict[int, str]:
    """Rows (by index) that a resume of ``plan`` must not keep, each with the reason."""
    expected = {p.key: p for p in plan.planned()}
    revlens = code_fingerprint()
    seen: set[RowKey] = set()
    stale = {}
    for i, row in enumerate(rows):
        key, have = row_key(row, plan.key_fields), row.get("provenance")
        if key not in expected:  # name the first key field (setting, cell) if that is what the file lacks
            known_first = key[0] in {k[0] for k in expected}
            stale[i] = f"{', '.join(plan.key_fields[1:] if known_first else plan.key_fields[:1])} not in the sweep file"
        elif key in seen:
            stale[i] = "duplicate row"
        elif not isinstance(have, dict):
            stale[i] = "unknown provenance (row written before rows carried one)"
        elif have.get("config") != expected[key].config:
            stale[i] = "produced by a different model/train/world config"
        elif have.get("revlens") != revlens:
            stale[i] = f"produced by a different revlens version ({have.get('revlens')}, this is {revlens})"
        seen.add(key)
    return stale


def row_key(row: dict[str, Any], key_fields: Sequence[str]) -> RowKey:
    """The key of a table row (``100`` and ``100.0`` compare and hash alike, so either names one RoPE base)."""
    return tuple(row[f] for f in key_fields)


def _describe(rows: Sequence[dict[str, Any]], stale: dict[int, str], key_fields: Sequence[str]) -> str:
    """"<first key> <last key field>s [..]: reason" per (first key fields, reason), in table order."""
    groups: dict[tuple[RowKey, str], list[Any]] = {}
    for i, reason in stale.items():
        key = row_key(rows[i], key_fields)
        groups.setdefault((key[:-1], reason), []).append(key[-1])
    return "; ".join(f"{' '.join(map(str, head))} {key_fields[-1]}s {tails}: {reason}"
                     for (head, reason), tails in groups.items())


def run_table(plan: SweepPlan, out: str | Path, progress: bool = True, jobs: int = 1, redo: bool = False) -> Path:
    """Train every row of ``plan`` not yet in ``out`` (a .jsonl table) and add it, with its provenance.

    The one sweep engine (see the module docstring for the guarantees). Rows already in ``out`` are
    kept only if their provenance matches ``plan`` and this library; others make this a ValueError
    naming them, or with ``redo`` are dropped (with a :class:`SweepWarning` naming them) and retrained.
    A row whose labels (e.g. ``group``) the sweep file has renamed is relabelled in place, with a
    warning: labels change no number. ``jobs > 1`` trains that many tasks at once in worker processes
    (:func:`revlens.workers.in_order`); rows are written in the sweep file's order, each task as soon as
    every task before it is written, so the table equals a one-process run's and an interrupted sweep
    resumes where it stopped.
    """
    check_jobs(jobs)
    out = Path(out)
    if out.exists() and not out.is_file():
        raise ValueError(f"{out} exists and is not a file")
    out.parent.mkdir(parents=True, exist_ok=True)
    table, torn = _read_table(out, plan.key_fields)
    stale = stale_rows(table, plan)
    if stale and not redo:
        raise ValueError(f"{out}: {len(stale)} row(s) do not match the sweep file {plan.name!r} and this revlens: "
                         f"{_describe(table, stale, plan.key_fields)}. Rerun with --redo to drop and retrain them, "
                         "or write to a new --out.")
    if stale:
        warnings.warn(f"{out}: dropping {len(stale)} row(s) to retrain: {_describe(table, stale, plan.key_fields)}",
                      SweepWarning, stacklevel=2)
    planned = plan.planned()
    by_key = {p.key: p for p in planned}
    table = [row for i, row in enumerate(table) if i not in stale]
    relabelled = [row for row in table if any(row.get(k) != v for k, v in by_key[row_key(row, plan.key_fields)].labels.items())]
    if relabelled:
        warnings.warn(f"{out}: {len(relabelled)} row(s) relabelled as the sweep file now names them "
                      f"({', '.join(sorted({k for p in planned for k in p.labels}))}); no number changes", SweepWarning,
                      stacklevel=2)
        for row in relabelled:
            row.update(by_key[row_key(row, plan.key_fields)].labels)
    if stale or torn or relabelled:
        write_rows(out, table)
    done = {row_key(row, plan.key_fields) for row in table}
    todo = [p for p in planned if p.key not in done]
    tasks = plan.tasks(todo)
    revlens = code_fingerprint()
    bar = tqdm(total=len(planned), initial=len(done), desc=f"sweep {plan.name}", unit="model", disable=not progress)
    for rows in in_order(plan.worker, tasks, jobs, cost=plan.cost if jobs > 1 and len(tasks) > 1 else None):
        for row in rows:
            key = row_key(row, plan.key_fields)
            if key in by_key and key not in done:
                done.add(key)
                table.append({**{k: v for k, v in row.items() if k != "provenance"}, **by_key[key].labels,
                              "provenance": {"config": by_key[key].config, "revlens": revlens}})
        write_rows(out, table)
        bar.update(len(done) - bar.n)
    bar.close()
    return out


def _train_rows(setting: Setting, group: str, spec: SweepSpec) -> list[dict[str, Any]]:
    """Worker: train one setting (all seeds, batched); its rows."""
    runs = train_setting(setting, spec.world, spec.seeds, spec.train, progress=False)
    return list(run_rows(setting, group, runs, spec.world))


def step_seconds(setting: Setting, spec: SweepSpec, repeats: int = 3) -> float:
    """Measured wall time of one batched training step of ``setting`` (all seeds): a cost estimate."""
    import time

    train_cfg = dataclasses.replace(spec.train, objective=setting.objective, steps=repeats, log_every=repeats)
    start = time.perf_counter()
    train(setting.model_cfg(spec.world), spec.world, train_cfg, spec.seeds, progress=False)
    return (time.perf_counter() - start) / repeats


def run_sweep(spec: SweepSpec, out: str | Path, progress: bool = True, jobs: int = 1, redo: bool = False) -> Path:
    """Run every setting not yet complete in ``out`` (a .jsonl file) and add its rows (:func:`run_table`).

    A setting trains all its seeds as one batched run. ``jobs > 1`` trains that many settings at once
    in worker processes, splitting the machine's threads between them: the tiny per-setting steps use
    two single-threaded processes better than one two-threaded one (results are identical; seeded CPU
    kernels gave bit-identical weights at 1 and 2 threads here). Workers exit when this process dies.
    """
    return run_table(spec, out, progress=progress, jobs=jobs, redo=redo)
