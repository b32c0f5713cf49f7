"""Named experimental settings, seeded multi-seed training with an on-disk cache, result tables.

A :class:`Setting` is an objective plus changes to the base architecture, so "ARM" and "MDM"
differ exactly in what their definitions say. ``train_setting`` trains all seeds of a setting in
one batched run and caches the checkpoints under a key that hashes the model config, the training
config, the world and the source of the whole package -- so notebooks can share
trained models, and a code change never serves stale weights. Every cached file is checked
against the checksums written with it (:mod:`revlens.checkpoint`); an entry that fails is reported
(:class:`CacheWarning`, naming the file), deleted and retrained, never served.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from revlens import checkpoint, training
from revlens.config import EncoderConfig
from revlens.objectives import Objective
from revlens.dynamics import AlignmentLogger
from revlens.routes import RouteLogger
from revlens.stats import mean_ci
from revlens.training import TrainConfig, TrainRun
from revlens.world import EVAL_SETS, ReversalWorld

BASE_MODEL: dict[str, Any] = {"d_model": 64, "n_heads": 4, "d_head": 16, "n_layers": 1, "positional": "rotary"}
"""The one-layer, four-head, attention-only RoPE encoder every toy notebook starts from."""


@dataclass(frozen=True)
class Setting:
    """An objective and the architecture changes that define one arm of an experiment."""

    name: str
    objective: Objective
    model: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def model_cfg(self, world: ReversalWorld) -> EncoderConfig:
        return EncoderConfig(d_vocab=world.d_vocab, n_ctx=3, **{**BASE_MODEL, **self.model})


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in [
        Setting("MDM", "mdm", {"attention_dir": "bidirectional"}, "masked diffusion, bidirectional, RoPE"),
        Setting("ARM", "arm", {"attention_dir": "causal"}, "next-token, causal, RoPE"),
        Setting("MDM-causal", "mdm", {"attention_dir": "causal"}, "masked diffusion objective, causal mask"),
        Setting("MDM-alibi", "mdm", {"attention_dir": "bidirectional", "positional": "alibi"}, "masked diffusion, ALiBi"),
        Setting("MDM-nopos", "mdm", {"attention_dir": "bidirectional", "positional": "none"}, "masked diffusion, no positions"),
        Setting(
            "MDM-absolute",
            "mdm",
            {"attention_dir": "bidirectional", "positional": "absolute"},
            "masked diffusion, learned absolute positions",
        ),
    ]
}


class CacheWarning(UserWarning):
    """A run-cache entry failed its integrity check and is being retrained."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("REVLENS_CACHE", Path.home() / ".cache" / "revlens"))


def code_fingerprint(root: str | Path | None = None) -> str:
    """Hash of every source file of the package and of the torch version: a run is reused (and a
    sweep row kept) only by the code that made it.

    Every ``*.py`` under the package folder is hashed, in subpackages too (such as
    ``revlens.routing``), each keyed by its path relative to the folder (``routing/world.py``), so a
    file moved or renamed changes the hash as well. Hashing all of it (not a hand-kept list of
    "modules that matter") means a change to evaluation, readouts, loggers or checkpoints can never
    serve stale histories; the price is a retrain after edits to files that do not affect training,
    such as plotting. The real-architecture subpackage ``revlens.lm`` (the folder ``lm/``) is never
    imported by toy training and is not hashed. torch's version is, since its kernels produce the
    weights. ``root``: the package folder to hash (default: this package's; tests pass a copy).
    """
    from revlens.provenance import source_fingerprint

    return source_fingerprint(Path(__file__).parent if root is None else root, skip=("lm",))


def cache_key(
    model_cfg: EncoderConfig,
    world: ReversalWorld,
    train_cfg: TrainConfig,
    seeds: Sequence[int],
    callback_ids: Sequence[str | None] = (),
) -> str:
    payload = {
        "callbacks": list(callback_ids),
        "model": model_cfg.to_dict(),
        "train": train_cfg.to_dict(),
        "world": world.to_dict(),
        "seeds": list(seeds),
        "code": code_fingerprint(),
        "init_noise": training.init_noise(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def standard_loggers(world: ReversalWorld, objective: Objective) -> list[training.Callback]:
    """Routes (:class:`RouteLogger`) and gradient alignment (:class:`AlignmentLogger`) every log step."""
    return [RouteLogger(world, objective), AlignmentLogger(world, objective)]


def train_setting(
    setting: Setting,
    world: ReversalWorld,
    seeds: Sequence[int],
    train_cfg: TrainConfig | None = None,
    *,
    cache_dir: Path | None = None,
    use_cache: bool = True,
    callbacks: Sequence[training.Callback] = (),
    instrument: bool = True,
    progress: bool = True,
) -> list[TrainRun]:
    """All seeds of ``setting``, trained together (or loaded from the cache when identical).

    With ``instrument`` (the default) every history row also holds the route statistics and the
    gradient-alignment measurements of :func:`standard_loggers`, so every notebook analyses the
    same runs.

    Callbacks that carry a ``cache_id`` (e.g. :class:`revlens.routes.RouteLogger`) are part of
    the cache key, and their logged values are cached with the history; a run with any callback
    lacking one is never cached, since its values could not be told apart.

    ``progress`` reports training under the setting's name (:class:`revlens.training.StepProgress`);
    a run served from the cache is reported as done at once, so a progress reader counts it.
    """
    train_cfg = dataclasses.replace(train_cfg or TrainConfig(), objective=setting.objective)
    model_cfg = setting.model_cfg(world)
    if instrument:
        callbacks = [*standard_loggers(world, setting.objective), *callbacks]
    callback_ids = [getattr(cb, "cache_id", None) for cb in callbacks]
    key = cache_key(model_cfg, world, train_cfg, seeds, callback_ids)
    folder = (cache_dir or default_cache_dir()) / "runs" / key
    cacheable = use_cache and None not in callback_ids
    if cacheable and all((folder / f"seed{s}").is_dir() for s in seeds):
        try:
            runs = [checkpoint.load_run(folder / f"seed{s}", require_checksums=True)[0] for s in seeds]
        except (ValueError, OSError) as err:
            warnings.warn(f"run cache entry {folder} is damaged ({err}); retraining it", CacheWarning, stacklevel=2)
        else:
            training.StepProgress(setting.name, seeds, train_cfg.steps, enabled=progress, cached=True)
            return runs
    runs = training.train(model_cfg, world, train_cfg, seeds, callbacks=callbacks, progress=progress,
                          name=setting.name)
    if cacheable:
        shutil.rmtree(folder, ignore_errors=True)  # what is there is incomplete (a crash) or damaged
        for run in runs:
            checkpoint.save_run(run, world, folder / f"seed{run.seed}")
    return runs


def metrics_table(runs_by_setting: Mapping[str, Sequence[TrainRun]]) -> pd.DataFrame:
    """One row per (setting, seed) with the final accuracies and chance."""
    rows = []
    for name, runs in runs_by_setting.items():
        for run in runs:
            m = run.metrics
            rows.append({"setting": name, "seed": run.seed, **{s: m[f"{s}_acc"] for s in EVAL_SETS}, "chance": m["chance"]})
    return pd.DataFrame(rows)


def summarise(table: pd.DataFrame, columns: Sequence[str] = EVAL_SETS) -> pd.DataFrame:
    """Mean, min and max over seeds of each column, per setting (NaN where undefined)."""
    grouped = table.groupby("setting", sort=False)[list(columns)]
    out = pd.concat({"mean": grouped.mean(), "min": grouped.min(), "max": grouped.max()}, axis=1)
    return out.swaplevel(axis=1).reindex(columns=list(columns), level=0)


def ci_table(table: pd.DataFrame, columns: Sequence[str], by: str = "setting") -> pd.DataFrame:
    """"mean ± half-width" strings per group (rounded to 2 decimals), rows in first-seen order."""
    out = {}
    for name, rows in table.groupby(by, sort=False):
        cells = {}
        for c in columns:
            mean, half = mean_ci(rows[c])
            cells[c] = "n/a" if pd.isna(mean) else f"{mean:.2f} ± {half:.2f}"
        out[name] = cells
    return pd.DataFrame(out).T


def history_frame(runs_by_setting: Mapping[str, Sequence[TrainRun]]) -> pd.DataFrame:
    """Long-format training curves: setting, seed, step, loss and every logged metric."""
    rows = [
        {"setting": name, "seed": run.seed, **row}
        for name, runs in runs_by_setting.items()
        for run in runs
        for row in run.history
    ]
    return pd.DataFrame(rows)
