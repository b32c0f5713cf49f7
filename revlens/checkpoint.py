"""Checkpoints as safetensors weights plus JSON metadata -- never pickle.

A checkpoint folder holds ``model.safetensors``, ``config.json`` (model config, training config,
seed), ``world.json`` (the facts it was trained on), ``metrics.json`` (final evaluation),
``history.json`` (the logged curve) and ``checksums.json`` (the SHA-256 of each of those files).
Loading checks the checksums, then the weights against the config, and names any changed file or
missing, unexpected or mis-shaped tensor.

Crash safety: :func:`save_run` writes everything into a hidden temporary folder next to the
destination (``checksums.json`` last), fsyncs it and only then renames it into place, so a crash
leaves the previous checkpoint (or nothing), never a half-written one; at worst a hidden
``.NAME.tmp-*`` folder remains next to it.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from revlens.atomic import folder_swap, fsync_path, write_text_atomic
from revlens.config import EncoderConfig, load_json
from revlens.model import ToyTransformer
from revlens.training import TrainConfig, TrainRun
from revlens.weights import CorruptCheckpoint, load_weights, read_weights
from revlens.world import ReversalWorld

WEIGHTS, CONFIG, WORLD, METRICS, HISTORY, CHECKSUMS = (
    "model.safetensors",
    "config.json",
    "world.json",
    "metrics.json",
    "history.json",
    "checksums.json",
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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a toy checkpoint :func:`save_run` wrote (its config records model and training), as
    opposed to any folder with a ``config.json`` -- a downloaded model, say -- which is never replaced."""
    if not ((folder / CONFIG).is_file() and (folder / WORLD).is_file()):
        return False
    try:
        meta = load_json(folder / CONFIG)
    except ValueError:
        return False
    return isinstance(meta, dict) and {"model", "train", "seed"} <= set(meta)


def check_destination(folder: str | Path) -> Path:
    """Fail now, not after training, if a checkpoint cannot be written to ``folder``.

    ``folder`` may be absent, an empty folder or an earlier checkpoint (which is replaced); anything
    else -- a file, a folder of other things, a parent that cannot be created or written -- is an
    error naming it. Probes by creating (and removing) the temporary folder :func:`save_run` uses.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder; choose a new checkpoint folder")
    if folder.is_dir() and any(folder.iterdir()) and not is_checkpoint(folder):
        raise ValueError(f"{folder} is a non-empty folder that is not a revlens checkpoint; refusing to overwrite it: "
                         "choose a new or empty folder")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    except OSError as err:
        raise ValueError(f"cannot write a checkpoint to {folder}: {err.strerror or err}") from None
    return folder


def save_run(run: TrainRun, world: ReversalWorld, folder: str | Path) -> Path:
    """Write a trained run to ``folder`` atomically, replacing an earlier checkpoint there; returns the folder."""
    folder = check_destination(folder)
    with folder_swap(folder) as tmp:
        state = {k: v.detach().contiguous() for k, v in run.model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        _write_json(tmp / CONFIG, {"model": run.model.cfg.to_dict(), "train": run.train_cfg.to_dict(), "seed": run.seed})
        world.save(tmp / WORLD)
        _write_json(tmp / METRICS, run.metrics)
        _write_json(tmp / HISTORY, run.history)
        files = (WEIGHTS, CONFIG, WORLD, METRICS, HISTORY)
        for name in files:
            fsync_path(tmp / name)
        # the checksums last: a folder without them was never finished
        write_text_atomic(tmp / CHECKSUMS, json.dumps({name: _sha256(tmp / name) for name in files}, indent=1) + "\n")
    return folder


def verify_checksums(folder: str | Path, *, required: bool = False) -> None:
    """Raise :class:`CorruptCheckpoint` naming the file if a file differs from ``checksums.json``.

    Without ``checksums.json`` (checkpoints written before it existed) this passes unless ``required``.
    """
    folder = Path(folder)
    if not (folder / CHECKSUMS).is_file():
        if required:
            raise CorruptCheckpoint(f"{folder / CHECKSUMS} is missing: the checkpoint was not completely written")
        return
    try:
        expected = load_json(folder / CHECKSUMS)
    except ValueError as err:
        raise CorruptCheckpoint(str(err)) from None
    if not isinstance(expected, dict) or not all(isinstance(v, str) for v in expected.values()):
        raise CorruptCheckpoint(f"{folder / CHECKSUMS} is not a mapping of file name to SHA-256")
    for name, digest in expected.items():
        path = folder / name
        if Path(name).name != name:
            raise CorruptCheckpoint(f"{folder / CHECKSUMS} names a file outside the folder: {name!r}")
        if not path.is_file():
            raise CorruptCheckpoint(f"{path} is missing")
        if _sha256(path) != digest:
            raise CorruptCheckpoint(f"{path} does not match its checksum in {CHECKSUMS}: changed or damaged since it was written")


def load_run(folder: str | Path, *, require_checksums: bool = False) -> tuple[TrainRun, ReversalWorld]:
    """Read a checkpoint folder written by :func:`save_run`, after checking its checksums.

    ``require_checksums`` (the run cache) also refuses a folder without ``checksums.json``.
    """
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"{folder} is not a revlens checkpoint (needs {WEIGHTS} and {CONFIG})")
    verify_checksums(folder, required=require_checksums)
    meta = load_json(folder / CONFIG)
    missing = [k for k in ("model", "train", "seed") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(f"{folder / CONFIG} lacks {', '.join(repr(k) for k in missing)}")
    try:
        model = ToyTransformer(EncoderConfig.from_dict(meta["model"]))
        train_cfg = TrainConfig.from_dict(meta["train"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{folder / CONFIG}: {err}") from None
    load_weights(model, read_weights(folder / WEIGHTS), str(folder / WEIGHTS))
    model.eval()
    history = load_json(folder / HISTORY) if (folder / HISTORY).is_file() else []
    if not isinstance(history, list) or not all(isinstance(row, dict) for row in history):
        raise ValueError(f"{folder / HISTORY} must hold a list of logged rows")
    run = TrainRun(model, meta["seed"], train_cfg, [_null_to_nan(row) for row in history])
    return run, ReversalWorld.load(folder / WORLD)
