"""The README and the docs pages: their examples run, their links resolve, and the README stays a short front page.

Every ```python block of README.md runs. In docs/*.md and bench/README.md a block runs when the line before
its opening fence is ``<!-- runnable -->`` (an HTML comment, invisible when rendered); other blocks there
are illustrations (real checkpoints, GPUs). Blocks run from the repository root, in a fresh namespace each,
with torch on one thread (tiny models: a second thread only adds contention).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.test_notebooks_meta import EXTERNAL_REFERENCES

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "bench" / "README.md", ROOT / "data" / "README.md"]
RUNNABLE = "<!-- runnable -->"
INSTALL = ("python3 -m venv .venv && .venv/bin/python -m pip install -r requirements.txt "
           "&& .venv/bin/revlens reproduce")
TEST = ".venv/bin/python -m pytest"
MAX_README_BYTES = 12 * 1024


def python_blocks(path: Path, marked_only: bool) -> list[tuple[int, str]]:
    """(line of the opening fence, code) of each ```python block, only those marked runnable if asked."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, body = i + 1, []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            marked = start >= 2 and lines[start - 2].strip() == RUNNABLE
            if marked or not marked_only:
                blocks.append((start, "\n".join(body) + "\n"))
        i += 1
    return blocks


EXAMPLES = [(README, *block) for block in python_blocks(README, marked_only=False)] + [
    (page, *block) for page in PAGES for block in python_blocks(page, marked_only=True)
]


def test_there_are_examples_to_run():
    assert len(python_blocks(README, marked_only=False)) >= 2  # the two quick starts
    assert any(page.parent.name == "docs" for page, _, _ in EXAMPLES)


@pytest.mark.parametrize(("path", "line", "code"), EXAMPLES,
                         ids=[f"{p.relative_to(ROOT)}:{line}" for p, line, _ in EXAMPLES])
def test_example_runs(path, line, code, monkeypatch):
    monkeypatch.chdir(ROOT)  # examples name shipped files by their repository paths
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(code, f"{path.relative_to(ROOT)}:{line}", "exec"), {"__name__": "__example__"})
    finally:
        torch.set_num_threads(threads)


def test_readme_is_a_short_front_page():
    size = len(README.read_bytes())
    assert size <= MAX_README_BYTES, f"README.md is {size} bytes; move detail into docs/ (limit {MAX_README_BYTES})"


def test_install_run_and_test_commands_are_on_the_first_screen():
    first = README.read_text().splitlines()[:60]
    assert INSTALL in first
    assert TEST in first


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    missing = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        file = target.split("#")[0]
        if not (path.parent / file).exists():
            missing.append(target)
    assert not missing, f"{path.relative_to(ROOT)} links to missing files: {missing}"


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_cite_nothing_outside_the_repository(path):
    """What tests/test_notebooks_meta.py checks for the READMEs, for every page."""
    hits = sorted({m.group(0) for m in EXTERNAL_REFERENCES.finditer(path.read_text())})
    assert not hits, f"{path.relative_to(ROOT)} refers to documents or processes outside the repository: {hits}"
