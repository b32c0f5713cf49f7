"""The model families revlens wraps, and how each one is built from its config.json.

========  ======================  =====================  ==========  ========================
family    config architectures    TransformerLens        objective   the answer to token i is
========  ======================  =====================  ==========  ========================
llada     LLaDAModelLM            LLaDAModelLM adapter   masked      read at position i
dream     DreamModel              DreamModel adapter     masked      read at position i - 1
qwen2     Qwen2ForCausalLM        Qwen2 adapter          next-token  read at position i - 1
llama     LlamaForCausalLM        LLaMA adapter          next-token  read at position i - 1
========  ======================  =====================  ==========  ========================

LLaDA is our own module (:mod:`revlens.lm.llada`); Dream is transformers' Qwen2 with the causal
mask removed (Dream is Qwen2.5-7B continued with a masked objective, same weights layout); the
matched ARMs are transformers' own Qwen2 and LLaMA. No modeling code is downloaded or executed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from revlens.lm.llada import LLaDAConfig, LLaDAModelLM
from revlens.readout import Readout


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str  # the TransformerLens adapter (and HF ``architectures`` entry)
    masked: bool  # trained to fill mask tokens (MDM) rather than to continue text (ARM)
    readout: Readout



FAMILIES: dict[str, Family] = {
    "llada": Family("llada", "LLaDAModelLM", masked=True, readout="same_position"),
    "dream": Family("dream", "DreamModel", masked=True, readout="shifted"),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", masked=False, readout="shifted"),
    "llama": Family("llama", "LlamaForCausalLM", masked=False, readout="shifted"),
}
_BY_ARCHITECTURE = {f.architecture: f for f in FAMILIES.values()}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; revlens wraps {', '.join(FAMILIES)}")
    return FAMILIES[name]


def detect_family(raw_config: dict[str, Any]) -> Family:
    """The family a config.json describes, from its ``architectures`` (or ``model_type``)."""
    for arch in raw_config.get("architectures") or []:
        if arch in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[arch]
    model_type = str(raw_config.get("model_type", "")).lower()
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    raise ValueError(
        f"unknown model family: config.json has architectures={raw_config.get('architectures')} "
        f"model_type={raw_config.get('model_type')!r}; revlens wraps "
        + ", ".join(f"{f.name} ({f.architecture})" for f in FAMILIES.values())
    )


_LLADA_FIELDS: dict[str, type] = {**dict.fromkeys(("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size",
                                                  "vocab_size", "embedding_size", "max_sequence_length"), int),
                                   "rope_theta": float, "rms_norm_eps": float}
_HF_FIELDS: dict[str, type] = {**dict.fromkeys(("hidden_size", "num_attention_heads", "num_key_value_heads",
                                               "num_hidden_layers", "intermediate_size", "vocab_size",
                                               "max_position_embeddings", "head_dim"), int),
                               "rope_theta": float, "rms_norm_eps": float}


def config_fields(family: Family) -> dict[str, type]:
    """The structural config.json fields of ``family`` and their kind: ``int`` (a positive integer) or ``float``
    (a positive finite number); a field of another type would fail deep inside model construction."""
    return _LLADA_FIELDS if family.name == "llada" else _HF_FIELDS


def _hf_classes(family: Family) -> tuple[Any, Any]:
    """transformers' config and model classes for a non-LLaDA family (Dream is Qwen2's layout)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    return (LlamaConfig, LlamaForCausalLM) if family.name == "llama" else (Qwen2Config, Qwen2ForCausalLM)


def build_module(family: Family, raw_config: dict[str, Any], *, meta: bool = True) -> tuple[nn.Module, Any]:
    """The family's module and the HF-style config for the bridge.

    With ``meta=True`` (loading) the weights are left unallocated and then loaded with ``assign=True``
    (:func:`revlens.weights.load_weights`), so an 8B model is never allocated twice nor randomly
    initialised. With ``meta=False`` the module gets the family's standard initialisation
    (Normal(0, 0.02) weights, unit norms), seeded by the caller.
    """
    with torch.device("meta" if meta else "cpu"):
        if family.name == "llada":
            config = LLaDAConfig.from_dict(raw_config)
            module = LLaDAModelLM(config)
            if not meta:
                module.init_weights()
            return module, config.to_hf_config()
        config_cls, model_cls = _hf_classes(family)
        dropped = ("auto_map", "architectures", "model_type", "transformers_version")
        hf_config = config_cls(**{k: v for k, v in raw_config.items() if k not in dropped})
        hf_config.architectures = [family.architecture]
        return model_cls(hf_config), hf_config


def rebuild_buffers(family: Family, module: nn.Module, device: str | torch.device) -> None:
    """Recompute transformers' rotary frequencies, a non-persistent buffer a meta-built module lacks
    (our LLaDA computes its tables per call and has none)."""
    if family.name != "llada":
        with torch.device(device):
            module.model.rotary_emb = type(module.model.rotary_emb)(config=module.config)


def _tied_head(family: Family, module: nn.Module) -> bool:
    return family.name != "llada" and bool(getattr(module.config, "tie_word_embeddings", False))


def not_stored(family: Family, module: nn.Module) -> frozenset[str]:
    """State-dict entries a checkpoint legitimately omits: the output head when it is tied."""
    return frozenset({"lm_head.weight"}) if _tied_head(family, module) else frozenset()


def tie_if_needed(family: Family, module: nn.Module) -> None:
    if _tied_head(family, module):
        module.lm_head.weight = module.model.embed_tokens.weight
