"""Atomic writes leave files and folders with the modes plain writes would give them."""

import os
import stat

from revlens.atomic import folder_swap, write_text_atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_files_and_folders_get_the_modes_of_plain_writes(tmp_path):
    old = os.umask(0o022)
    try:
        (tmp_path / "plain.txt").write_text("x")
        write_text_atomic(tmp_path / "atomic.txt", "x")
        assert _mode(tmp_path / "atomic.txt") == _mode(tmp_path / "plain.txt") == 0o644
        (tmp_path / "plain_dir").mkdir()
        with folder_swap(tmp_path / "swapped") as tmp:
            (tmp / "f").write_text("x")
        assert _mode(tmp_path / "swapped") == _mode(tmp_path / "plain_dir") == 0o755
    finally:
        os.umask(old)


def test_a_stricter_umask_is_honoured(tmp_path):
    old = os.umask(0o077)
    try:
        write_text_atomic(tmp_path / "private.txt", "x")
        assert _mode(tmp_path / "private.txt") == 0o600
    finally:
        os.umask(old)
