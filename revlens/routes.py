"""Reading attention routes through hooks, and their forward/reverse correlation across facts.

A *route* is the attention from a query position (the mask, or an ARM's readout position) to a key
position (the entity B). For each prompt we read the pre-softmax score from
``blocks.{l}.attn.hook_attn_scores`` and the weight from ``blocks.{l}.attn.hook_pattern`` in one
batched forward pass, caching only those hooks. Any model exposing these TransformerLens hook
names and ``cfg.n_layers`` works, not only the toy encoder.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from revlens.objectives import READOUTS, Objective
from revlens.stats import pearson

if TYPE_CHECKING:  # the toy world is only a type here: reading routes needs no toy module
    from revlens.world import ReversalWorld

SCORE_HOOK = "blocks.{layer}.attn.hook_attn_scores"
PATTERN_HOOK = "blocks.{layer}.attn.hook_pattern"


def route_at(values: Float[Tensor, "batch head query_pos key_pos"], query_pos: Int[Tensor, "batch *route"],
             key_pos: Int[Tensor, "batch *route"]) -> Float[Tensor, "batch *route head"]:
    """Read routes off one layer's attention scores or pattern: ``values[b, :, query_pos[b, ...], key_pos[b, ...]]``,
    every head, the two position tensors broadcast against each other per prompt (e.g. one query and several
    keys, or several queries and one key). The one place routes are read from a hook's tensor: the toy's routes,
    the routing world's readout row and a generation's routes by step all go through it."""
    query_pos, key_pos = torch.broadcast_tensors(torch.as_tensor(query_pos), torch.as_tensor(key_pos))
    rows = torch.arange(values.shape[0]).view(-1, *[1] * (query_pos.dim() - 1))
    return values[rows, :, query_pos, key_pos]


@dataclass(frozen=True)
class RoutePrompts:
    """Prompts with, per prompt, the query position and the key position of the route."""

    prompts: Int[Tensor, "n pos"]
    query_pos: Int[Tensor, " n"]
    key_pos: Int[Tensor, " n"]

    @classmethod
    def fixed(cls, prompts: Tensor, query_pos: int, key_pos: int) -> "RoutePrompts":
        n = prompts.shape[0]
        return cls(prompts, torch.full((n,), query_pos), torch.full((n,), key_pos))


@dataclass(frozen=True)
class RouteReadings:
    scores: Float[Tensor, "n layer head"]
    weights: Float[Tensor, "n layer head"]


@dataclass(frozen=True)
class RouteCorrelation:
    """Per-(layer, head) Pearson correlation across facts of the forward and reverse routes."""

    score_corr: Float[Tensor, "layer head"]
    weight_corr: Float[Tensor, "layer head"]
    forward: RouteReadings
    reverse: RouteReadings


@torch.no_grad()
def read_routes(model, routes: RoutePrompts) -> RouteReadings:
    """Score and weight of each prompt's route, for every layer and head, in one forward pass."""
    n_layers = model.cfg.n_layers
    names = [h.format(layer=l) for l in range(n_layers) for h in (SCORE_HOOK, PATTERN_HOOK)]
    _, cache = model.run_with_cache(routes.prompts, names_filter=names)

    def gather(hook: str) -> Tensor:
        per_layer = [route_at(cache[hook.format(layer=l)], routes.query_pos, routes.key_pos) for l in range(n_layers)]
        return torch.stack(per_layer, dim=1)  # [n, layer, head]

    return RouteReadings(gather(SCORE_HOOK), gather(PATTERN_HOOK))


def read_routes_ragged(
    model, prompts: Sequence[Sequence[int]], query_pos: Sequence[int], key_pos: Sequence[int]
) -> RouteReadings:
    """:func:`read_routes` for prompts of different lengths: one forward pass per length, rows kept in order."""
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    scores: list[Tensor] = [torch.empty(0)] * len(prompts)
    weights: list[Tensor] = [torch.empty(0)] * len(prompts)
    for rows in by_len.values():
        group = RoutePrompts(torch.tensor([list(prompts[i]) for i in rows]), torch.tensor([query_pos[i] for i in rows]),
                             torch.tensor([key_pos[i] for i in rows]))
        readings = read_routes(model, group)
        for k, i in enumerate(rows):
            scores[i], weights[i] = readings.scores[k].cpu(), readings.weights[k].cpu()
    return RouteReadings(torch.stack(scores), torch.stack(weights))


def correlate_routes(fwd: RouteReadings, rev: RouteReadings) -> RouteCorrelation:
    """Per-(layer, head) Pearson correlation across facts (row i of each reading is fact i)."""
    if fwd.scores.shape != rev.scores.shape:
        raise ValueError("forward and reverse readings must list the same facts in the same order")
    return RouteCorrelation(
        pearson(fwd.scores.permute(1, 2, 0).float(), rev.scores.permute(1, 2, 0).float()),
        pearson(fwd.weights.permute(1, 2, 0).float(), rev.weights.permute(1, 2, 0).float()),
        fwd,
        rev,
    )


def route_correlation(model, forward: RoutePrompts, reverse: RoutePrompts) -> RouteCorrelation:
    """Correlate, fact by fact, the forward and reverse routes (prompt i of each is fact i)."""
    if forward.prompts.shape[0] != reverse.prompts.shape[0]:
        raise ValueError("forward and reverse prompts must list the same facts in the same order")
    return correlate_routes(read_routes(model, forward), read_routes(model, reverse))


def toy_routes(world: ReversalWorld, objective: Objective) -> tuple[RoutePrompts, RoutePrompts]:
    """The forward and reverse routes of the toy world's forward-only facts, for ``objective``.

    Masked models: the mask attends to B in the trained "[M] r B" (query 0, key 2) and in the
    untrained "B r [M]" (query 2, key 0) -- same q and k, opposite offsets.
    Left-to-right models have no prompt where the readout sees B while predicting A, so the
    counterpart is the readout position (r, position 1) attending to the fact's subject: A in the
    trained "A r" and B in the reverse "B r".
    """
    inplace, forward, reverse = (world.eval_set(n) for n in ("inplace", "forward", "reverse"))
    if READOUTS[objective] == "same_position":
        return RoutePrompts.fixed(inplace.prompts, 0, 2), RoutePrompts.fixed(reverse.prompts, 2, 0)
    return RoutePrompts.fixed(forward.prompts, 1, 0), RoutePrompts.fixed(reverse.prompts, 1, 0)


class RouteLogger:
    """Training callback recording the toy routes every log step (mean over heads and facts)."""

    def __init__(self, world: ReversalWorld, objective: Objective):
        self.forward, self.reverse = toy_routes(world, objective)
        self.cache_id = f"RouteLogger/{objective}"

    def __call__(self, step: int, model) -> dict[str, float]:
        rc = route_correlation(model, self.forward, self.reverse)
        return {
            "route_score_corr": float(rc.score_corr.nanmean()),
            "route_weight_corr": float(rc.weight_corr.nanmean()),
            "route_weight_fwd": float(rc.forward.weights.mean()),
            "route_weight_rev": float(rc.reverse.weights.mean()),
            # the head that looks at B most in the reverse prompt (a saturated head hides in the mean)
            "route_weight_rev_max_head": float(rc.reverse.weights.mean(0).max()),  # weights: [fact, layer, head]
        }
