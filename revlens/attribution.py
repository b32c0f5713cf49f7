"""Which attended token pushes the mask towards the wrong *type* of answer?

In the toy world a failed reverse query is usually not a wrong A but a B-alphabet token: the model
predicts "some B" where an A belongs. In a one-layer, attention-only model without a final norm the
logits are linear in the residual stream at the readout position,

    resid = x_q + sum_k sum_h pattern[h, q, k] * v[k, h] @ W_O[h]

(``x_q`` is the readout position's own embedding, plus its absolute position vector if any), so the
*type logit* -- the mean logit over the answer's alphabet minus the mean over the other alphabet,

    type = resid . u,   u = mean_{a in answer alphabet} W_U[:, a] - mean_{b in other alphabet} W_U[:, b]

-- splits exactly into one term for the position's own embedding (the "direct" path) and one term
per attended key position. The split is exact (tested against the logits) and read through the
model's own hooks (``hook_pattern``, ``hook_v``), so it also holds with per-position untied values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from revlens.model import ToyTransformer


@dataclass(frozen=True)
class TypeLogitSplit:
    """Per prompt: the type logit at the readout position and its exact decomposition."""

    total: Float[Tensor, " n"]
    direct: Float[Tensor, " n"]  # the readout position's own embedding (+ absolute position)
    by_key: Float[Tensor, "n key_pos"]  # through attention, from each key position (heads summed)
    by_key_head: Float[Tensor, "n head key_pos"]  # the same, per head


@torch.no_grad()
def type_logit_split(
    model: ToyTransformer,
    prompts: Int[Tensor, "n pos"],
    read_pos: int,
    answer_alphabet: Int[Tensor, " n_answer"],
    other_alphabet: Int[Tensor, " n_other"],
) -> TypeLogitSplit:
    """Split ``mean logit(answer alphabet) - mean logit(other alphabet)`` at ``read_pos`` by source.

    Defined for a one-layer, attention-only model (no MLP, no norm); raises otherwise, since with
    more layers or an MLP the split is no longer a sum of per-token terms.
    """
    cfg = model.cfg
    if cfg.n_layers != 1 or not cfg.attn_only:
        raise ValueError("type_logit_split needs a one-layer attention-only model (the split is exact only there)")
    if not 0 <= read_pos < prompts.shape[1]:
        raise ValueError(f"read_pos {read_pos} outside prompts of length {prompts.shape[1]}")
    u = model.W_U[:, answer_alphabet].mean(-1) - model.W_U[:, other_alphabet].mean(-1)  # [d_model]
    hooks = ["hook_embed", "blocks.0.attn.hook_pattern", "blocks.0.attn.hook_v"]
    if cfg.positional == "absolute":
        hooks.append("hook_pos_embed")
    logits, cache = model.run_with_cache(prompts, names_filter=hooks)
    own = cache["hook_embed"][:, read_pos]
    if cfg.positional == "absolute":
        own = own + cache["hook_pos_embed"][read_pos]
    direct = (own @ u) * (1.0 if cfg.residual else 0.0)
    pattern = cache["blocks.0.attn.hook_pattern"][:, :, read_pos]  # [n, head, key]
    value_out = torch.einsum("nkhd,hdm,m->nhk", cache["blocks.0.attn.hook_v"], model.blocks[0].attn.W_O, u)
    by_key_head = pattern * value_out
    total = logits[:, read_pos, answer_alphabet].mean(-1) - logits[:, read_pos, other_alphabet].mean(-1)
    return TypeLogitSplit(total, direct, by_key_head.sum(1), by_key_head)
