"""revlens: why masked diffusion LMs suffer less from the reversal curse than autoregressive ones.

The names below are the toy-model API (world, model, training, checkpoints, readout, routes,
patching); real architectures (LLaDA, Dream, Qwen2, LLaMA) live in :mod:`revlens.lm`. Every name
is imported on first use (PEP 562), so ``import revlens`` loads neither torch nor TransformerLens.
"""

import importlib as _importlib
import importlib.util as _importlib_util

_EXPORTS = {
    # the toy reversal world and the model
    "ReversalWorld": "revlens.world",
    "EncoderConfig": "revlens.config",
    "ToyTransformer": "revlens.model",
    # training, checkpoints, evaluation
    "TrainConfig": "revlens.training",
    "TrainRun": "revlens.training",
    "train": "revlens.training",
    "init_model": "revlens.training",
    "save_run": "revlens.checkpoint",
    "load_run": "revlens.checkpoint",
    "evaluate": "revlens.evaluation",
    "logits_at_masks": "revlens.readout",
    # routes, theory, patching
    "RoutePrompts": "revlens.routes",
    "route_correlation": "revlens.routes",
    "toy_routes": "revlens.routes",
    "rope_score_correlation": "revlens.theory",
    "batched_patch": "revlens.patching",
}

__all__ = sorted(_EXPORTS)


def _lazy_exports(namespace: dict, exports: dict[str, str]):
    """``__getattr__`` and ``__dir__`` for a package whose ``exports`` (name -> module) load on first use.

    ``__getattr__`` imports an exported name from its module (and stores it, so later lookups no longer
    come here) or a submodule not imported yet; anything else is an AttributeError.
    """
    package = namespace["__name__"]

    def __getattr__(name: str) -> object:
        module = exports.get(name)
        if module is not None:
            value = getattr(_importlib.import_module(module), name)
            namespace[name] = value
            return value
        if not name.startswith("_") and _importlib_util.find_spec(f"{package}.{name}") is not None:
            return _importlib.import_module(f"{package}.{name}")  # e.g. revlens.training
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(exports) | {n for n in namespace if not n.startswith("_")})

    return __getattr__, __dir__


__getattr__, __dir__ = _lazy_exports(globals(), _EXPORTS)
