"""Attention controls: replace where a query position attends, to test whether its route matters.

A claim such as "the mask reaches B through a route shared with the forward prompt" is only
testable where the route is *needed*. The control is to keep everything else fixed and hand the
query position a pattern that knows nothing about the prompt: uniform over every key it may see
(all keys for a bidirectional model; keys up to and including itself under a causal mask), or the
model's own pattern with its keys shuffled. If accuracy survives the control, the answer does not
depend on where the query attends, and the world cannot tell a good route from a bad one.

The hooks edit ``blocks.{l}.attn.hook_pattern`` ([batch, head, query, key], post-softmax) at the
given query positions only, so the rest of the forward pass is the model's own. They work on any
model exposing that hook name (the toy :class:`revlens.model.ToyTransformer`, and
:class:`revlens.lm.HookedLM` for LLaDA, whose pattern hook is editable).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

AttentionControl = Literal["uniform", "shuffled"]
ATTENTION_CONTROLS: tuple[str, ...] = ("uniform", "shuffled")
HookFn = Callable[..., Tensor]


def _allowed_keys(pattern: Float[Tensor, "batch head query_pos key_pos"], causal: bool) -> Tensor:
    """Boolean [query, key]: which keys each query may attend to."""
    n_query, n_key = pattern.shape[-2:]
    allowed = torch.ones(n_query, n_key, dtype=torch.bool, device=pattern.device)
    return allowed.tril() if causal else allowed


def controlled_pattern(
    pattern: Float[Tensor, "batch head query_pos key_pos"],
    query_pos: int | Sequence[int],
    control: AttentionControl,
    causal: bool,
    generator: torch.Generator | None = None,
) -> Float[Tensor, "batch head query_pos key_pos"]:
    """``pattern`` with the rows of ``query_pos`` replaced by the control's pattern.

    ``uniform``: 1 / (number of visible keys) on every visible key. ``shuffled``: the row's own
    weights permuted among its visible keys (one permutation per batch row and head), which keeps
    the pattern's sharpness and destroys only *where* it points.
    """
    if control not in ATTENTION_CONTROLS:
        raise ValueError(f"unknown attention control {control!r}; expected one of {', '.join(ATTENTION_CONTROLS)}")
    positions = [query_pos] if isinstance(query_pos, int) else list(query_pos)
    n_query = pattern.shape[-2]
    if not positions or any(not 0 <= q < n_query for q in positions):
        raise ValueError(f"query positions {positions} must lie in [0, {n_query}) for this prompt length")
    out = pattern.clone()
    allowed = _allowed_keys(pattern, causal)
    for q in positions:
        keys = allowed[q].nonzero()[:, 0]
        row = torch.zeros_like(pattern[..., q, :])
        if control == "uniform":
            row[..., keys] = 1.0 / len(keys)
        else:
            visible = pattern[..., q, keys]  # [batch, head, n_visible]
            order = torch.rand(visible.shape, generator=generator).argsort(dim=-1).to(visible.device)
            row[..., keys] = visible.gather(-1, order)
        out[..., q, :] = row
    return out


def attention_control_hooks(
    model,
    query_pos: int | Sequence[int],
    control: AttentionControl = "uniform",
    layers: Sequence[int] | None = None,
    seed: int = 0,
) -> list[tuple[str, HookFn]]:
    """``fwd_hooks`` that apply ``control`` to the pattern of ``query_pos`` in ``layers`` (default all).

    Use with ``model.run_with_hooks(tokens, fwd_hooks=...)`` or ``with model.hooks(fwd_hooks=...)``.
    ``seed`` fixes the permutations of the ``shuffled`` control.
    """
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else list(layers)
    if any(not 0 <= layer < n_layers for layer in layers):
        raise ValueError(f"layers {layers} must lie in [0, {n_layers})")
    causal = getattr(model.cfg, "attention_dir", "bidirectional") == "causal"
    generator = torch.Generator().manual_seed(seed)

    def hook(pattern: Tensor, hook=None) -> Tensor:  # noqa: ARG001 (TransformerLens passes the HookPoint)
        return controlled_pattern(pattern, query_pos, control, causal, generator)

    return [(f"blocks.{layer}.attn.hook_pattern", hook) for layer in layers]
