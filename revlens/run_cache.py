"""The on-disk run cache: trained runs stored under a key of everything that made them, checked on every read.

:func:`revlens.experiments.train_setting` serves a run from here when an identical one was trained before, so
notebooks share trained models. The key (:func:`cache_key`) hashes the model config, the training config, the
world, the seeds, the loggers and the source of the package (:func:`code_fingerprint`), so a code change never
serves stale weights. Every cached file is checked against the checksums written with it
(:mod:`revlens.checkpoint`); an entry that fails is reported (:class:`CacheWarning`, naming the file), and the
caller retrains and replaces it, never serving it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

from revlens import checkpoint, training
from revlens.config import EncoderConfig
from revlens.training import TrainConfig, TrainRun
from revlens.world import ReversalWorld


class CacheWarning(UserWarning):
    """A run-cache entry failed its integrity check and is being retrained."""


def default_cache_dir() -> Path:
    """``$REVLENS_CACHE``, else ``~/.cache/revlens``."""
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
    """The name of a run's entry: a hash of everything that sets its weights and its logged values (the
    loggers by their ``cache_id``), the library source and the initial-weight noise included."""
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


def entry_folder(key: str, cache_dir: Path | None = None) -> Path:
    """The folder of the entry ``key`` (one ``seed<k>`` checkpoint folder per seed) under ``cache_dir``
    (default :func:`default_cache_dir`)."""
    return (cache_dir or default_cache_dir()) / "runs" / key


def load_entry(folder: Path, seeds: Sequence[int], *, stacklevel: int = 2) -> list[TrainRun] | None:
    """The cached runs of ``seeds`` in ``folder``, in that order; None when a seed is missing, or when a file
    fails its checksums, which is reported as a :class:`CacheWarning` naming it (``stacklevel`` as for
    :func:`warnings.warn`, 2 naming the caller of this function)."""
    if not all((folder / f"seed{s}").is_dir() for s in seeds):
        return None
    try:
        return [checkpoint.load_run(folder / f"seed{s}", require_checksums=True)[0] for s in seeds]
    except (ValueError, OSError) as err:
        warnings.warn(f"run cache entry {folder} is damaged ({err}); retraining it", CacheWarning,
                      stacklevel=stacklevel)
        return None


def save_entry(folder: Path, runs: Sequence[TrainRun], world: ReversalWorld) -> None:
    """Store ``runs`` (trained on ``world``) as the entry ``folder``, replacing whatever is there."""
    shutil.rmtree(folder, ignore_errors=True)  # what is there is incomplete (a crash) or damaged
    for run in runs:
        checkpoint.save_run(run, world, folder / f"seed{run.seed}")
