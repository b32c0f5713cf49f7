"""Observable and editable attention for models whose TransformerLens adapter delegates attention.

TransformerLens's ``DreamModel`` adapter hands attention to the transformers module wholesale, so
out of the box its ``hook_pattern`` sees the weights only *after* they were used (edits change
nothing) and its ``hook_attn_scores`` receives post-softmax weights. We register one attention
function with transformers (``REVLENS_ATTENTION``) that computes eager attention and calls, inside
the computation,

* ``hook_attn_scores`` on the true pre-softmax scores  [batch, head, query, key], and
* ``hook_pattern`` on the softmax weights              [batch, head, query, key],

both of them the bridge's own hook points, so cache, hooks and edits behave as in the LLaDA
adapter. The pattern hook reaches us through TransformerLens's ``pattern_fn`` seam
(``accepts_pattern_fn``); the scores hook is attached to the transformers attention module. The
function returns no weights, so the bridge fires nothing a second time after the fact.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

REVLENS_ATTENTION = "revlens_hooked"
_SCORES_HOOK_ATTR = "_revlens_scores_hook"


def hooked_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    pattern_fn: Callable[[Tensor], Tensor] | None = None,
    **unused: Any,
) -> tuple[Tensor, None]:
    """Eager attention with the scores and pattern passed through hooks; output [batch, query, head, d_head]."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = query @ key.transpose(-2, -1) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    scores_hook = module.__dict__.get(_SCORES_HOOK_ATTR)
    if scores_hook is not None:
        scores = scores_hook(scores)
    pattern = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    pattern = nn.functional.dropout(pattern, p=dropout, training=module.training)
    if pattern_fn is not None:
        pattern = pattern_fn(pattern)
    return (pattern @ value).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(REVLENS_ATTENTION, hooked_attention)
    AttentionMaskInterface.register(REVLENS_ATTENTION, eager_mask)


def install_hooked_attention(hf_model: nn.Module, bridge: Any) -> None:
    """Route every attention layer of ``hf_model`` through :func:`hooked_attention` with ``bridge``'s hooks."""
    _register()
    hf_model.set_attn_implementation(REVLENS_ATTENTION)
    for block in bridge.blocks:
        attn = block.attn.original_component
        object.__setattr__(attn, _SCORES_HOOK_ATTR, block.attn.hook_attn_scores)  # not a submodule
        attn.accepts_pattern_fn = True


def make_bidirectional(hf_model: nn.Module) -> None:
    """Remove the causal mask from a transformers decoder (Qwen2 / LLaMA layout), keeping padding masks.

    The decoder builds its causal mask only when it is not handed a ready mask mapping, so a
    pre-hook turns the caller's padding mask (1 = real token) into the full bidirectional mapping.
    """
    decoder = hf_model.model
    for layer in decoder.layers:
        layer.self_attn.is_causal = False

    def to_bidirectional(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict):
            return args, kwargs
        full = None
        if mask is not None and not bool(mask.all()):
            dtype = decoder.embed_tokens.weight.dtype
            keep = mask[:, None, None, :].bool()
            full = torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill(~keep, torch.finfo(dtype).min)
        kwargs["attention_mask"] = {"full_attention": full, "sliding_attention": full}
        return args, kwargs

    decoder.register_forward_pre_hook(to_bidirectional, with_kwargs=True)
