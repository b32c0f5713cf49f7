"""Test files mirror modules: ``tests/test_<name>.py`` tests ``revlens/<name>.py`` (or the package ``revlens/<name>/``),
``tests/test_<package>_<name>.py`` tests ``revlens/<package>/<name>.py`` (``test_lm_text_reversal.py`` tests
``revlens/lm/text_reversal.py``), so the tests of a module are found by its name."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "revlens"

CROSS_CUTTING = {
    # each tests a concern spread over several modules, not one module
    "test_ablations.py",  # the ablation switches of config, model and objectives, and a sweep over them
    "test_bad_input_cli.py",  # bad input on the toy side of the command line, across the modules it reaches
    "test_bad_input_generation.py",  # bad arguments to denoising generation and to step patching
    "test_bad_input_lm.py",  # bad input on the real-architecture side: loaders, scoring, the text harness
    "test_layout.py",  # this file: the layout of tests/ itself
    "test_notebooks_meta.py",  # static checks on the committed notebooks
    "test_progress.py",  # training progress from the trainer, the run cache and the stack, read by reports
    "test_public_api.py",  # the public names of revlens and revlens.lm, and what importing them loads
    "test_readme.py",  # the README and docs pages: examples run, links resolve
    "test_setup.py",  # the README's set-up commands and CI agree
    "test_sweep_table.py",  # the shipped ablation table under data/ (named in notebook 04)
}


def module_names() -> set[str]:
    """``name`` for every ``revlens/<name>.py`` and package ``revlens/<name>/``, ``<package>_<name>`` for every
    ``revlens/<package>/<name>.py``."""
    names = {path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    for package in PACKAGE.glob("*/__init__.py"):
        names.add(package.parent.name)
        names |= {f"{package.parent.name}_{path.stem}" for path in package.parent.glob("*.py")
                  if path.stem != "__init__"}
    return names


def test_every_test_file_names_an_existing_module():
    modules = module_names()
    orphans = sorted(path.name for path in (ROOT / "tests").glob("test_*.py")
                     if path.name not in CROSS_CUTTING and path.stem.removeprefix("test_") not in modules)
    assert not orphans, (f"{orphans} name no module: call a test file test_<module>.py (test_<package>_<module>.py "
                         "in a subpackage), or add it to CROSS_CUTTING with the reason")


def test_every_exception_is_still_there():
    missing = sorted(name for name in CROSS_CUTTING if not (ROOT / "tests" / name).is_file())
    assert not missing, f"CROSS_CUTTING lists files that are gone: {missing}"
