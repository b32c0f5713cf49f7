"""The public names of ``revlens`` and ``revlens.lm``: they resolve, and importing the packages stays cheap."""

from __future__ import annotations

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


# What `import revlens.lm` loaded before its names became lazy: the families and HookedLM modules and,
# through revlens.checkpoint, the toy training loop and world. It must never load more than this.
EAGER_LM_IMPORTS = frozenset({
    "revlens", "revlens.atomic", "revlens.checkpoint", "revlens.config", "revlens.controls", "revlens.evaluation",
    "revlens.hooks", "revlens.lm", "revlens.lm.families", "revlens.lm.hf_attention", "revlens.lm.hooked_lm",
    "revlens.lm.llada", "revlens.model", "revlens.objectives", "revlens.optim", "revlens.positions",
    "revlens.readout", "revlens.training", "revlens.world",
})


def test_import_revlens_lm_loads_no_toy_module():
    loaded = {m for m in modules_after("import revlens.lm") if m.startswith("revlens")}
    assert loaded <= EAGER_LM_IMPORTS
    assert "revlens.training" not in loaded and "revlens.world" not in loaded
    assert loaded == {"revlens", "revlens.lm"}


def test_hooked_lm_loads_no_more_than_it_did():
    loaded = {m for m in modules_after("from revlens.lm import HookedLM") if m.startswith("revlens")}
    assert loaded <= EAGER_LM_IMPORTS
