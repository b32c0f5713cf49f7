"""Checkpoints as safetensors weights plus JSON metadata -- never pickle.

A checkpoint folder holds ``model.safetensors``, ``config.json`` (model config, training config,
seed), ``world.json`` (the facts it was trained on), ``metrics.json`` (final evaluation) and
``history.json`` (the logged curve). Loading checks the weights against the config and names any
missing, unexpected or mis-shaped tensor.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from revlens.config import EncoderConfig
from revlens.model import HookedEncoder
from revlens.training import TrainConfig, TrainRun
from revlens.world import ReversalWorld

WEIGHTS, CONFIG, WORLD, METRICS, HISTORY = (
    "model.safetensors",
    "config.json",
    "world.json",
    "metrics.json",
    "history.json",
)


def _nan_to_null(data: Any) -> Any:
    """Strict JSON has no NaN: undefined metrics (e.g. in-place accuracy of an ARM) become null."""
    if isinstance(data, float) and math.isnan(data):
        return None
    if isinstance(data, dict):
        return {k: _nan_to_null(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_nan_to_null(v) for v in data]
    return data


def _null_to_nan(row: dict[str, Any]) -> dict[str, Any]:
    return {k: math.nan if v is None else v for k, v in row.items()}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(_nan_to_null(data), indent=1, allow_nan=False) + "\n")


def save_run(run: TrainRun, world: ReversalWorld, folder: str | Path) -> Path:
    """Write a trained run to ``folder`` (created if needed); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in run.model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    _write_json(
        folder / CONFIG,
        {"model": run.model.cfg.to_dict(), "train": run.train_cfg.to_dict(), "seed": run.seed},
    )
    world.save(folder / WORLD)
    _write_json(folder / METRICS, run.metrics)
    _write_json(folder / HISTORY, run.history)
    return folder


def load_weights(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    *,
    not_stored: frozenset[str] = frozenset(),
    assign: bool = False,
) -> None:
    """Copy ``state`` into ``model``; a missing, unexpected or mis-shaped tensor is an error naming it.

    ``not_stored`` names model entries a checkpoint legitimately omits (a tied output head);
    ``assign=True`` adopts the tensors themselves (for modules built on the meta device).
    """
    expected = {k: v for k, v in model.state_dict().items() if k not in not_stored}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = [f"missing {', '.join(missing)}"] if missing else []
        parts += [f"unexpected {', '.join(unexpected)}"] if unexpected else []
        raise ValueError(f"{source} does not match the model config: {'; '.join(parts)}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{source}: weight {name} has shape {tuple(tensor.shape)}, "
                f"the config expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=not not_stored, assign=assign)


def load_run(folder: str | Path) -> tuple[TrainRun, ReversalWorld]:
    """Read a checkpoint folder written by :func:`save_run`."""
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"{folder} is not a revlens checkpoint (needs {WEIGHTS} and {CONFIG})")
    meta = json.loads((folder / CONFIG).read_text())
    model = HookedEncoder(EncoderConfig.from_dict(meta["model"]))
    load_weights(model, load_file(str(folder / WEIGHTS)), str(folder / WEIGHTS))
    model.eval()
    history = json.loads((folder / HISTORY).read_text()) if (folder / HISTORY).is_file() else []
    history = [_null_to_nan(row) for row in history]
    run = TrainRun(model, meta["seed"], TrainConfig(**meta["train"]), history)
    return run, ReversalWorld.load(folder / WORLD)
