"""Named experimental settings and their seeded multi-seed training.

A :class:`Setting` is an objective plus changes to the base architecture, so "ARM" and "MDM"
differ exactly in what their definitions say. ``train_setting`` trains all seeds of a setting in
one batched run, or serves them from the on-disk run cache (:mod:`revlens.run_cache`) when an
identical run was trained before, so notebooks share trained models and a code change never serves
stale weights. The tables of their results are in :mod:`revlens.tables`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from revlens import run_cache, training
from revlens.config import EncoderConfig
from revlens.objectives import Objective
from revlens.dynamics import AlignmentLogger
from revlens.routes import RouteLogger
from revlens.training import TrainConfig, TrainRun
from revlens.world import ReversalWorld

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
    key = run_cache.cache_key(model_cfg, world, train_cfg, seeds, callback_ids)
    folder = run_cache.entry_folder(key, cache_dir)
    cacheable = use_cache and None not in callback_ids
    if cacheable:
        runs = run_cache.load_entry(folder, seeds, stacklevel=3)  # a damaged entry: warns naming our caller
        if runs is not None:
            training.StepProgress(setting.name, seeds, train_cfg.steps, enabled=progress, cached=True)
            return runs
    runs = training.train(model_cfg, world, train_cfg, seeds, callbacks=callbacks, progress=progress,
                          name=setting.name)
    if cacheable:
        run_cache.save_entry(folder, runs, world)
    return runs
