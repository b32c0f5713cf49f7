"""The public names of ``revlens`` and ``revlens.lm``: they resolve, and importing the packages stays cheap."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import revlens
import revlens.lm


@pytest.mark.parametrize("package", [revlens, revlens.lm], ids=lambda m: m.__name__)
def test_every_exported_name_resolves_and_is_listed(package):
    assert package.__all__ == sorted(set(package.__all__))
    for name in package.__all__:
        value = getattr(package, name)
        assert value is not None, f"{package.__name__}.{name}"
        assert name in dir(package)
    namespace: dict = {}
    exec(f"from {package.__name__} import *", namespace)
    assert set(package.__all__) <= set(namespace)


@pytest.mark.parametrize("package", [revlens, revlens.lm], ids=lambda m: m.__name__)
def test_unknown_names_raise_attribute_error_and_submodules_still_import(package):
    with pytest.raises(AttributeError):
        package.no_such_name  # noqa: B018
    assert not hasattr(package, "no_such_name")
    submodule = "training" if package is revlens else "generation"
    assert getattr(package, submodule).__name__ == f"{package.__name__}.{submodule}"


def modules_after(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after ``statement``."""
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


def test_import_revlens_loads_no_library_module_and_no_torch():
    loaded = modules_after("import revlens")
    assert {m for m in loaded if m.startswith("revlens")} == {"revlens"}
    assert "torch" not in loaded


def test_import_revlens_lm_loads_no_toy_module():
    loaded = {m for m in modules_after("import revlens.lm") if m.startswith("revlens")}
    assert loaded == {"revlens", "revlens.lm"}


# The layers (docs/library.md): a shared core that knows neither the toy world nor a real architecture; the toy
# library (the reversal world, the toy encoder, its training, checkpoints, analyses and sweeps) and the
# real-architecture subpackage ``revlens.lm``, each built on the core only.
CORE_MODULES = frozenset(f"revlens.{name}" for name in (
    "atomic", "config", "facts", "hooks", "objectives", "patching", "positions", "provenance", "readout", "routes",
    "stats", "weights", "workers",
))
TOY_MODULES = frozenset(f"revlens.{name}" for name in (
    "checkpoint", "controls", "evaluation", "model", "optim", "training", "world", "stack", "routing",
    "dynamics", "theory", "experiments", "run_cache", "tables", "sweep", "attribution",
))
LM_MODULES = sorted(f"revlens.lm.{path.stem}" for path in (Path(revlens.__file__).parent / "lm").glob("*.py")
                    if path.stem != "__init__")


def _revlens_modules(loaded: set[str]) -> set[str]:
    return {m for m in loaded if m.startswith("revlens.")}


@pytest.mark.slow
def test_stats_loads_no_other_revlens_module():
    loaded = {m for m in modules_after("import revlens.stats") if m.startswith("revlens")}
    assert loaded == {"revlens", "revlens.stats"}


@pytest.mark.slow
def test_core_modules_import_only_the_core():
    loaded = _revlens_modules(modules_after("; ".join(f"import {m}" for m in sorted(CORE_MODULES))))
    assert loaded <= CORE_MODULES, f"core modules load {sorted(loaded - CORE_MODULES)}"


@pytest.mark.slow
def test_no_real_architecture_module_loads_a_toy_module():
    """Every module of ``revlens.lm``, imported in a fresh interpreter, loads only ``revlens.lm`` and the core (its
    own lazy imports, e.g. of the toy checkpoint reader for a toy model, are not counted)."""
    loaded = _revlens_modules(modules_after("; ".join(f"import {m}" for m in LM_MODULES)))
    outside = {m for m in loaded if not m.startswith("revlens.lm")} - CORE_MODULES
    assert not outside, f"revlens.lm loads modules outside the core: {sorted(outside)}"


def test_every_module_is_in_one_layer():
    """A new module must be placed: core, toy, or one of the entry points (command line, reports, plotting)."""
    entry_points = {"revlens.cli", "revlens.reports", "revlens.plotting", "revlens.notebook", "revlens.routing_flips",
                    "revlens.routing_offsets"}
    package = Path(revlens.__file__).parent
    modules = {f"revlens.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"}
    modules |= {f"revlens.{p.parent.name}" for p in package.glob("*/__init__.py") if p.parent.name != "lm"}
    assert not CORE_MODULES & TOY_MODULES
    unplaced = modules - CORE_MODULES - TOY_MODULES - entry_points
    assert not unplaced, f"modules in no layer: {sorted(unplaced)}"


@pytest.mark.parametrize("statement", ["from revlens.lm import HookedLM", "import revlens.lm.hooked_lm"])
@pytest.mark.slow
def test_hooked_lm_loads_no_toy_module(statement):
    loaded = modules_after(statement)
    assert "revlens.lm.hooked_lm" in loaded
    assert not loaded & TOY_MODULES, f"{statement!r} loads toy modules {sorted(loaded & TOY_MODULES)}"


@pytest.mark.parametrize(("old", "new", "name"), [
    ("revlens.checkpoint", "revlens.weights", "CorruptCheckpoint"),
    ("revlens.checkpoint", "revlens.weights", "load_weights"),
    ("revlens.checkpoint", "revlens.weights", "read_weights"),
    ("revlens.lm.hooked_lm", "revlens.weights", "read_safetensors_folder"),
    ("revlens.model", "revlens.config", "check_token_ids"),
    ("revlens.objectives", "revlens.readout", "Readout"),
])
def test_moved_names_are_still_importable_from_their_old_module(old, new, name):
    assert getattr(importlib.import_module(old), name) is getattr(importlib.import_module(new), name)
