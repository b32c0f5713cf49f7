"""The public names of ``revlens`` and ``revlens.lm``: they resolve, and importing the packages stays cheap."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

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


# The toy library: the reversal world, the toy encoder and its training, checkpoints and analyses. The real-model
# code builds only on the core modules (atomic, config, hooks, positions, readout, stats, weights).
TOY_MODULES = frozenset(f"revlens.{name}" for name in (
    "checkpoint", "controls", "evaluation", "model", "objectives", "optim", "training", "world", "stack", "routing",
    "routes", "dynamics", "theory", "experiments", "run_cache", "tables", "sweep", "attribution", "patching",
))


@pytest.mark.slow
def test_stats_loads_no_other_revlens_module():
    loaded = {m for m in modules_after("import revlens.stats") if m.startswith("revlens")}
    assert loaded == {"revlens", "revlens.stats"}


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
