"""Batched activation patching: many patched runs in one forward pass, same numbers as TransformerLens.

Activation patching asks *where* a behaviour lives. Run the model on a corrupted prompt (here, a
reverse query whose answer the model should not find, or a different fact), and at one site --
the residual stream at (layer, position), or one head's output at one layer -- replace the
corrupted activation by the activation from the clean run. If the metric (e.g. the log-probability
of the clean answer) recovers, that site carries the information.

``transformer_lens.patching`` runs one full forward pass per site. Here the corrupted batch is
repeated once per site from the first patched layer on (the layers before it run once), a single
hook per layer writes each copy's own patch, and sites that would patch nothing are not run, so a
sweep over all (layer, position) sites costs a fraction of the arithmetic in a few passes. Results
equal ``get_act_patch_resid_pre`` / ``get_act_patch_attn_head_out_all_pos`` (tested to < 1e-5);
the metric is called on each copy's logits exactly as TransformerLens calls it on each run's.
How many sites share a pass follows from the batch and the model's widths
(:func:`auto_sites_per_pass`); ``sites_per_pass`` sets it by hand (an 8B model on a GPU wants a
handful).

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

Metric = Callable[[Float[Tensor, "batch pos vocab"]], Float[Tensor, ""]]
RESID_PRE = "blocks.{layer}.hook_resid_pre"
HEAD_Z = "blocks.{layer}.attn.hook_z"  # [batch, pos, head, d_head]


PASS_ELEMENTS = 1 << 21  # widest activation of one pass, in elements: ~8 MB of float32, cache-friendly on a CPU


def auto_sites_per_pass(model: Any, batch: int, seq: int, *, budget: int = PASS_ELEMENTS) -> int:
    """How many sites one patched pass should hold: as many as keep its widest activation within ``budget``.

    A pass over ``k`` sites runs ``k * batch`` sequences; its largest tensor is about
    ``k * batch * seq * width`` elements, ``width`` the widest of the model's residual, MLP and
    vocabulary dimensions. Past a few MB per tensor a CPU pass falls out of cache and gets slower per
    row than several smaller passes (``bench/batched_patching.py`` measures it), so at least one site
    and at most ``budget`` elements go into a pass.
    """
    cfg = model.cfg
    width = max(int(getattr(cfg, name, 0) or 0) for name in ("d_model", "d_mlp", "d_vocab"))
    return max(1, budget // max(1, batch * seq * width))


@torch.no_grad()
def batched_patch(
    model: Any,
    corrupted_tokens: Int[Tensor, "batch pos"],
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

    Three savings, none of which changes a result (each site's run is the run TransformerLens makes):

    * a site whose clean activation equals the corrupted one (e.g. the residual stream before layer 0
      at a position where both prompts hold the same token) patches nothing, so its metric is the
      corrupted run's, computed once;
    * a pass over sites of layers ``>= L`` runs layers before ``L`` once on the unrepeated batch and
      repeats the batch only at ``blocks.L.hook_resid_pre``, where the runs start to differ;
    * sites are grouped ``sites_per_pass`` to a pass, by default :func:`auto_sites_per_pass` of the
      batch and the model's widths, so large batches never make one pass too big to be fast.
    """
    n, seq = corrupted_tokens.shape
    names = sorted({hook.format(layer=layer) for layer, _ in sites})
    corrupted_logits, corrupted_cache = model.run_with_cache(corrupted_tokens, names_filter=names)
    results = torch.full((len(sites),), float(metric(corrupted_logits).item()))
    to_run = [i for i, (layer, index) in enumerate(sites)
              if not _patch_is_identity(clean_cache, corrupted_cache, hook.format(layer=layer), index)]
    to_run.sort(key=lambda i: sites[i][0])  # passes of neighbouring layers share more unrepeated layers
    per_pass = sites_per_pass or auto_sites_per_pass(model, n, seq)
    chunks = [to_run[s : s + per_pass] for s in range(0, len(to_run), per_pass)]
    for chunk in tqdm(chunks, desc="patching", disable=not progress):
        chunk_sites = [sites[i] for i in chunk]
        first_layer = min(layer for layer, _ in chunk_sites)
        hooks = site_patch_hooks(hook, clean_cache, chunk_sites, n, repeat_at=RESID_PRE.format(layer=first_layer))
        logits = model.run_with_hooks(corrupted_tokens, fwd_hooks=hooks)
        if logits.shape[0] != len(chunk) * n:
            raise RuntimeError(f"{type(model).__name__} did not carry a batch repeated at {RESID_PRE.format(layer=first_layer)} "
                               f"to its logits ({logits.shape[0]} rows, expected {len(chunk) * n})")
        for copy, site in enumerate(chunk):
            results[site] = metric(logits[copy * n : (copy + 1) * n]).item()
    return results


def _patch_is_identity(clean: Any, corrupted: Any, name: str, index: tuple) -> bool:
    """Whether patching ``index`` of ``name`` would write exactly what the corrupted run already holds."""
    where = (slice(None), *index)
    return torch.equal(clean[name][where], corrupted[name][where].to(clean[name].device))


def site_patch_hooks(hook: str, clean: Any, sites: list[tuple[int, tuple]], n: int, *,
                     repeat_at: str | None = None) -> list[tuple[str, Callable[[Tensor, Any], Tensor]]]:
    """Hooks writing site ``c``'s clean activation into rows ``c * n ... (c + 1) * n`` of a repeated batch.

    ``clean`` maps hook names to the clean run's activations (an ActivationCache, or one step of a
    :class:`revlens.lm.generation.StepCache`); one hook per layer patches every site of that layer.
    With ``repeat_at`` (a hook no later than the first patched one) the run enters with ``n`` rows
    and the hook there repeats them once per site; without it the caller passes the repeated batch.
    """
    by_layer: dict[int, list[tuple[int, tuple]]] = defaultdict(list)
    for copy, (layer, index) in enumerate(sites):
        by_layer[layer].append((copy, index))
    copies = len(sites)

    def make_patch(layer: int) -> Callable[[Tensor], Tensor]:
        source = clean[hook.format(layer=layer)]

        def patch(activation: Tensor) -> Tensor:
            activation = activation.clone()
            for copy, index in by_layer[layer]:
                rows = slice(copy * n, (copy + 1) * n)
                activation[(rows, *index)] = source[(slice(None), *index)]
            return activation

        return patch

    steps: dict[str, list[Callable[[Tensor], Tensor]]] = defaultdict(list)
    if repeat_at is not None:
        steps[repeat_at].append(lambda activation: activation.repeat(copies, *(1,) * (activation.ndim - 1)))
    for layer in by_layer:
        steps[hook.format(layer=layer)].append(make_patch(layer))

    def chain(functions: list[Callable[[Tensor], Tensor]]) -> Callable[[Tensor, Any], Tensor]:
        def run(activation: Tensor, hook: Any) -> Tensor:
            for function in functions:
                activation = function(activation)
            return activation

        return run

    return [(name, chain(functions)) for name, functions in steps.items()]


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
