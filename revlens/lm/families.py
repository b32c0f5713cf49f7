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

from revlens.lm.llada import LLaDAConfig, LLaDAModelLM, RotaryEmbedding
from revlens.objectives import Readout


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str  # the TransformerLens adapter (and HF ``architectures`` entry)
    masked: bool  # trained to fill mask tokens (MDM) rather than to continue text (ARM)
    readout: Readout

    @property
    def causal(self) -> bool:
        return not self.masked


FAMILIES: dict[str, Family] = {
    "llada": Family("llada", "LLaDAModelLM", masked=True, readout="same_position"),
    "dream": Family("dream", "DreamModel", masked=True, readout="shifted"),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", masked=False, readout="shifted"),
    "llama": Family("llama", "LlamaForCausalLM", masked=False, readout="shifted"),
}
_BY_ARCHITECTURE = {f.architecture: f for f in FAMILIES.values()}
_BY_MODEL_TYPE = {"llada": "llada", "dream": "dream", "qwen2": "qwen2", "llama": "llama"}


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
    if model_type in _BY_MODEL_TYPE:
        return FAMILIES[_BY_MODEL_TYPE[model_type]]
    raise ValueError(
        f"unknown model family: config.json has architectures={raw_config.get('architectures')} "
        f"model_type={raw_config.get('model_type')!r}; revlens wraps "
        + ", ".join(f"{f.name} ({f.architecture})" for f in FAMILIES.values())
    )


def _hf_config(family: Family, raw: dict[str, Any]) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    keep = {k: v for k, v in raw.items() if k not in ("auto_map", "architectures", "model_type", "transformers_version")}
    config_cls = LlamaConfig if family.name == "llama" else Qwen2Config
    config = config_cls(**keep)
    config.architectures = [family.architecture]
    return config


def build_module(family: Family, raw_config: dict[str, Any], *, meta: bool = True) -> tuple[nn.Module, Any]:
    """The family's module and the HF-style config for the bridge.

    With ``meta=True`` (loading) the weights are left unallocated and then loaded with ``assign=True``
    (:func:`revlens.checkpoint.load_weights`), so an 8B model is never allocated twice nor randomly
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
        from transformers import LlamaForCausalLM, Qwen2ForCausalLM

        hf_config = _hf_config(family, raw_config)
        module = (LlamaForCausalLM if family.name == "llama" else Qwen2ForCausalLM)(hf_config)
        return module, hf_config


def rebuild_buffers(family: Family, module: nn.Module, device: str | torch.device) -> None:
    """Recompute the non-persistent buffers (rotary frequencies) that a meta-built module lacks."""
    if family.name == "llada":
        cfg: LLaDAConfig = module.config
        for block in module.model.transformer.blocks:
            block.rotary_emb = RotaryEmbedding(cfg.d_head, cfg.rope_theta).to(device)
        return
    with torch.device(device):
        module.model.rotary_emb = type(module.model.rotary_emb)(config=module.config)


def not_stored(family: Family, module: nn.Module) -> frozenset[str]:
    """State-dict entries a checkpoint legitimately omits: the output head when it is tied."""
    tied = family.name != "llada" and bool(getattr(module.config, "tie_word_embeddings", False))
    return frozenset({"lm_head.weight"}) if tied else frozenset()


def tie_if_needed(family: Family, module: nn.Module) -> None:
    if family.name != "llada" and bool(getattr(module.config, "tie_word_embeddings", False)):
        module.lm_head.weight = module.model.embed_tokens.weight
