"""Batched activation patching: many patched runs in one forward pass, same numbers as TransformerLens.

Activation patching asks *where* a behaviour lives. Run the model on a corrupted prompt (here, a
reverse query whose answer the model should not find, or a different fact), and at one site --
the residual stream at (layer, position), or one head's output at one layer -- replace the
corrupted activation by the activation from the clean run. If the metric (e.g. the log-probability
of the clean answer) recovers, that site carries the information.

``transformer_lens.patching`` runs one forward pass per site. Here the corrupted batch is repeated
once per site and a single hook per layer writes each copy's own patch, so a sweep over all
(layer, position) sites of a small model is one or a few forward passes. Results equal
``get_act_patch_resid_pre`` / ``get_act_patch_attn_head_out_all_pos`` (tested to < 1e-5); the
metric is called on each copy's logits exactly as TransformerLens calls it on each run's.
``sites_per_pass`` bounds memory: an 8B model wants a handful of sites per pass, the toy pair all.

The model may be any hooked model with TransformerLens hook names and ``cfg.n_layers`` /
``cfg.n_heads`` (a :class:`revlens.lm.HookedLM`, its ``.bridge``, or the toy encoder).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

Metric = Callable[[Float[Tensor, "batch seq vocab"]], Float[Tensor, ""]]
RESID_PRE = "blocks.{layer}.hook_resid_pre"
HEAD_Z = "blocks.{layer}.attn.hook_z"  # [batch, pos, head, d_head]


@torch.no_grad()
def batched_patch(
    model: Any,
    corrupted_tokens: Int[Tensor, "batch seq"],
    clean_cache: Any,
    metric: Metric,
    hook: str,
    sites: list[tuple[int, tuple]],
    *,
    sites_per_pass: int | None = None,
    progress: bool = False,
) -> Float[Tensor, " n_sites"]:
    """Metric after patching each site; a site is ``(layer, index)`` into the hook's activation.

    ``index`` selects, after the batch dimension, what is copied from the clean activation
    (``(pos,)`` for the residual stream, ``(slice(None), head)`` for a head's z at every position).
    """
    n = corrupted_tokens.shape[0]
    per_pass = sites_per_pass or len(sites)
    results = torch.empty(len(sites))
    chunks = [range(s, min(s + per_pass, len(sites))) for s in range(0, len(sites), per_pass)]
    for chunk in tqdm(chunks, desc="patching", disable=not progress):
        hooks = site_patch_hooks(hook, clean_cache, [sites[site] for site in chunk], n)
        logits = model.run_with_hooks(corrupted_tokens.repeat(len(chunk), 1), fwd_hooks=hooks)
        for copy, site in enumerate(chunk):
            results[site] = metric(logits[copy * n : (copy + 1) * n]).item()
    return results


def site_patch_hooks(hook: str, clean: Any, sites: list[tuple[int, tuple]],
                     n: int) -> list[tuple[str, Callable[[Tensor, Any], Tensor]]]:
    """Hooks writing site ``c``'s clean activation into rows ``c * n ... (c + 1) * n`` of a repeated batch.

    ``clean`` maps hook names to the clean run's activations (an ActivationCache, or one step of a
    :class:`revlens.lm.generation.StepCache`); one hook per layer patches every site of that layer.
    """
    by_layer: dict[int, list[tuple[int, tuple]]] = defaultdict(list)
    for copy, (layer, index) in enumerate(sites):
        by_layer[layer].append((copy, index))

    def make_hook(layer: int):
        source = clean[hook.format(layer=layer)]

        def patch(activation: Tensor, hook: Any) -> Tensor:
            activation = activation.clone()
            for copy, index in by_layer[layer]:
                rows = slice(copy * n, (copy + 1) * n)
                activation[(rows, *index)] = source[(slice(None), *index)]
            return activation

        return patch

    return [(hook.format(layer=layer), make_hook(layer)) for layer in by_layer]


def resid_pre_sites(n_layers: int, seq: int) -> list[tuple[int, tuple]]:
    """Every (layer, position) of the residual stream, layer-major."""
    return [(layer, (pos,)) for layer in range(n_layers) for pos in range(seq)]


def head_out_sites(n_layers: int, n_heads: int) -> list[tuple[int, tuple]]:
    """Every (layer, head) output, at all positions, layer-major."""
    return [(layer, (slice(None), head)) for layer in range(n_layers) for head in range(n_heads)]


def patch_resid_pre(model: Any, corrupted_tokens: Tensor, clean_cache: Any, metric: Metric,
                    **kwargs: Any) -> Float[Tensor, "layer pos"]:
    """Like ``transformer_lens.patching.get_act_patch_resid_pre``: every (layer, position) of the residual stream."""
    n_layers, seq = model.cfg.n_layers, corrupted_tokens.shape[1]
    sites = resid_pre_sites(n_layers, seq)
    return batched_patch(model, corrupted_tokens, clean_cache, metric, RESID_PRE, sites, **kwargs).reshape(n_layers, seq)


def patch_head_out(model: Any, corrupted_tokens: Tensor, clean_cache: Any, metric: Metric,
                   **kwargs: Any) -> Float[Tensor, "layer head"]:
    """Like ``get_act_patch_attn_head_out_all_pos``: each head's output (z) at every position."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    sites = head_out_sites(n_layers, n_heads)
    return batched_patch(model, corrupted_tokens, clean_cache, metric, HEAD_Z, sites, **kwargs).reshape(n_layers, n_heads)


def patch_names(model: Any, which: str) -> list[str]:
    """The hooks a patching sweep needs cached from the clean run (cache only these)."""
    template = {"resid_pre": RESID_PRE, "head_out": HEAD_Z}[which]
    return [template.format(layer=layer) for layer in range(model.cfg.n_layers)]
