"""Atomic writes: a kill at any moment leaves the old file (or folder) or the new one, never a torn one.

Every file revlens writes -- weights, tables, training records -- goes through a temporary file in the
same folder, is flushed to disk, and is renamed over its destination (``os.replace`` is atomic on
POSIX and Windows when both paths are on one file system). Folders are built under a temporary name
beside the destination and swapped in the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's file-creation mask (read by setting it and setting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def temporary_beside(path: Path) -> Iterator[Path]:
    """A temporary file name beside ``path``, renamed over ``path`` if the block succeeds, removed if not.

    The file gets the mode a plain ``open(path, "w")`` would give it (0o666 less the umask), not the
    owner-only 0o600 of a temporary file, so what is written atomically is as readable as anything else."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` by ``text`` (UTF-8) atomically."""
    with temporary_beside(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, data: Any, **dumps_kwargs: Any) -> None:
    """Replace ``path`` by ``data`` as indented JSON (one trailing newline) atomically."""
    dumps_kwargs.setdefault("indent", 1)
    write_text_atomic(path, json.dumps(data, **dumps_kwargs) + "\n")


def save_safetensors_atomic(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write a state dict as safetensors atomically (tensors made contiguous, detached)."""
    with temporary_beside(Path(path)) as tmp:
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp))


@contextmanager
def folder_swap(folder: str | Path, staging: str | Path | None = None) -> Iterator[Path]:
    """Build a folder under a temporary name and swap it in for ``folder`` when the block succeeds.

    Yields the temporary folder to fill. On success an existing ``folder`` is replaced as a whole (the
    old one moved aside first, removed last); on any error the temporary folder is removed and
    ``folder`` is untouched. Callers decide beforehand whether replacing ``folder`` is allowed.
    ``staging``: a fixed folder to build in instead (created if missing, its contents kept), which an
    error leaves in place, so that long work can resume from what it holds.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if staging is None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # a mkdir's mode, not the temporary folder's owner-only 0o700
    else:
        tmp = Path(staging)
        tmp.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                fsync_path(child)
        fsync_path(tmp)
        old = None
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
        fsync_path(folder.parent)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        if staging is None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
