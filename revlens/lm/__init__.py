"""Hooked wrappers for real diffusion LMs (LLaDA, Dream) and matched ARMs (Qwen2, LLaMA).

Loading and hooks (:class:`HookedLM`), fact sets and their scoring, route correlations and
activation patching, and denoising generation with step-indexed hooks. Every name is imported on
first use (PEP 562), so ``import revlens.lm`` loads only what a name needs.
"""

from revlens import _lazy_exports

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
__getattr__, __dir__ = _lazy_exports(globals(), _EXPORTS)
