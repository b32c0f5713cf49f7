"""Hooked wrappers for real diffusion LMs (LLaDA, Dream) and matched ARMs (Qwen2, LLaMA).

Loading and hooks (:class:`HookedLM`), fact sets and their scoring, route correlations and
activation patching, and denoising generation with step-indexed hooks. Every name is imported on
first use (PEP 562), so ``import revlens.lm`` loads only what a name needs.
"""

import importlib as _importlib
import importlib.util as _importlib_util

_EXPORTS = {
    # model families and loading
    "FAMILIES": "revlens.lm.families",
    "Family": "revlens.lm.families",
    "detect_family": "revlens.lm.families",
    "get_family": "revlens.lm.families",
    "HookedLM": "revlens.lm.hooked_lm",
    # fact sets, scoring, routes, patching
    "FactSet": "revlens.facts",
    "encode_query": "revlens.facts",
    "score_table": "revlens.lm.analysis",
    "fact_route_correlation": "revlens.lm.analysis",
    "patching_pairs": "revlens.lm.analysis",
    "reverse_patching": "revlens.lm.analysis",
    "batched_patch": "revlens.patching",
    "RESID_PRE": "revlens.patching",
    "patch_names": "revlens.patching",
    "resid_pre_sites": "revlens.patching",
    # denoising generation
    "generate": "revlens.lm.generation",
    "patch_generation": "revlens.lm.generation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    """An exported name, imported from its module on first use; or a submodule not imported yet."""
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(_importlib.import_module(module), name)
        globals()[name] = value  # later lookups no longer come here
        return value
    if not name.startswith("_") and _importlib_util.find_spec(f"{__name__}.{name}") is not None:
        return _importlib.import_module(f"{__name__}.{name}")  # e.g. revlens.lm.generation
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(__all__) | {n for n in globals() if not n.startswith("_")})
