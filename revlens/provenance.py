"""Where a result came from. When was a file committed (the evidence a pre-registration rests on: its prediction
file's commit precedes the commit of the results it predicts, read from git), and which source made it (a hash of
the package's files, so work is reused or resumed only by the code that began it)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path


def source_fingerprint(root: str | Path, skip: tuple[str, ...] = ()) -> str:
    """Hash of torch's version and every ``*.py`` under ``root``, each keyed by its path relative to ``root`` (so a
    file moved or renamed changes it too); files under the top-level folders named in ``skip`` are left out."""
    import torch

    root = Path(root)
    digest = hashlib.sha256(f"torch {torch.__version__}".encode())
    for name, path in sorted((path.relative_to(root).as_posix(), path) for path in root.rglob("*.py")):
        if name.split("/")[0] not in skip:
            digest.update(name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def registration_commit(path: str | Path) -> str:
    """``"<commit> <date>"`` of the git commit that added ``path`` (the earliest, if added more than once), or a
    sentence saying why it is unknown (not a git checkout, git missing, a shallow clone, whose oldest commit
    would seem to add every file, or the file not committed)."""
    path = Path(path).resolve()

    def git(*args: str) -> list[str]:
        return subprocess.run(["git", *args], cwd=path.parent, capture_output=True, text=True, check=True).stdout.split()

    try:
        if git("rev-parse", "--is-shallow-repository") == ["true"]:
            return "unknown (a shallow clone: its oldest commit would seem to add every file)"
        out = git("log", "--diff-filter=A", "--format=%H %cs", "--", path.name)
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout, or git is not installed)"
    return " ".join(out[-2:]) if out else "unknown (the file is not committed)"


def registered_before(first: str | Path, second: str | Path) -> bool | None:
    """Whether the commit that added ``first`` is a strict ancestor of the one that added ``second`` (the
    predictions were committed before the results), ``None`` if either commit is unknown."""
    a, b = (registration_commit(p).split()[0] for p in (first, second))
    if "unknown" in (a, b):
        return None
    check = subprocess.run(["git", "merge-base", "--is-ancestor", a, b], cwd=Path(first).resolve().parent,
                           capture_output=True)
    return a != b and check.returncode == 0
