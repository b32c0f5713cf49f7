"""Closed-form predictions for the routing world: no trained model, only the RoPE kernel and the geometry.

The matched filter for the trained offset (:func:`rope_kernel`, :func:`matched_filter_score`,
:func:`matched_filter_reverse_accuracy`), the same with RoPE's highest frequency only
(:func:`highest_frequency_reverse_accuracy`) and the baselines :func:`trained_offset_share` and
:func:`nearest_key_share`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from revlens.config import check_choice
from revlens.routing.world import N_DISTRACTORS, ROUTING_EVAL_SETS, distractor_offsets


def _pair_share(wins: dict[int, bool], ties: dict[int, bool] | None = None) -> float:
    """Share of the equally likely distractor offset pairs (o1 < o2) in which B wins: both distractors
    lose (``wins``). With ``ties`` (offsets whose distractor scores exactly B's score), a pair where no
    distractor beats B and k tie with it counts 1 / (1 + k), an even split of the tie."""
    ties = ties or {}

    def share(pair: tuple[int, int]) -> float:
        if not all(wins[o] or ties.get(o, False) for o in pair):
            return 0.0
        return 1 / (1 + sum(ties.get(o, False) for o in pair))

    pairs = [(o1, o2) for o1 in wins for o2 in wins if o1 < o2]
    if not pairs:
        raise ValueError(f"a layout needs at least {N_DISTRACTORS} distractor offsets, got {sorted(wins)}")
    return sum(share(pair) for pair in pairs) / len(pairs)


def rope_kernel(s: float, d_head: int, base: float) -> float:
    """The RoPE kernel ``K(s) = sum_m cos(theta_m s)``, ``theta_m = base^(-2m / d_head)`` (Su et al. 2021): half
    the trace of the rotation R(s), so ``K(s) / (d_head / 2) = tr R(s) / d_head``. Even in ``s``."""
    from revlens.positions import rope_frequencies

    return float(torch.cos(s * rope_frequencies(d_head, base)).sum())


def matched_filter_score(d_head: int, delta: int, base: float, distance: int, query: str = "reverse") -> float:
    """The score a matched filter for the trained offset ``+delta`` gives a key ``distance`` from the mask.

    Conventions: RoPE makes a score depend on ``r = key position - query position`` (the model's
    ``q . R(r) k``); the filter is ``g(r) = K(r - delta)``, largest at the trained ``r = +delta``. The
    reverse query puts its keys before the mask, ``r = -distance``: ``g = K(delta + distance)`` (B at
    ``distance = delta`` scores ``K(2 delta)``); the in-place query puts them after it, ``r = +distance``:
    ``g = K(distance - delta)`` (B scores ``K(0)``, the maximum)."""
    check_choice("query", query, ROUTING_EVAL_SETS)
    return rope_kernel(delta + (distance if query == "reverse" else -distance), d_head, base)


def matched_filter_reverse_accuracy(
    d_head: int, delta: int, base: float, eval_delta: int | None = None, query: str = "reverse", ties: str = "lose",
    offsets: Sequence[int] | None = None,
) -> float:
    """Accuracy of an idealised RoPE route that learned only the in-place offset ``delta``.

    Suppose training makes the mask-to-B score a matched filter for offset ``+delta``:
    ``g(r) = sum_m cos(theta_m (r - delta))`` over the RoPE frequencies, which peaks at
    ``r = delta`` for any set of distractors. The reverse prompt puts B at ``-delta`` and the
    distractors at ``-o``; the filter scores them ``K(2 delta)`` and ``K(delta + o)`` with
    ``K(s) = sum_m cos(theta_m s)`` -- ``K(2 delta) / (d / 2)`` is exactly tr R(2 delta) / d. The
    route picks B when ``K(2 delta)`` beats both distractors; this returns the share of distractor
    offset pairs (all equally likely, as in :class:`RoutingWorld`) where it does.

    ``eval_delta`` evaluates the same filter on prompts built for another offset ``d'`` (B at
    ``-d'``, distractor offsets those of ``d'``): B scores ``K(delta + d')``, a distractor
    ``K(delta + o)``. ``query="inplace"`` scores the in-place prompt instead: ``K(d' - delta)``
    against ``K(o - delta)``. It uses the closed form and the world's geometry only, no trained
    model and no measured accuracy.

    Ties: B must score *strictly* more than every distractor (``ties="lose"``, the default: a
    distractor that scores exactly B's score wins). They happen at held-out in-place offsets, where a
    distractor at ``delta -/+ 1`` scores ``K(-/+1) = K(+/-1)``, B's score at ``delta +/- 1``;
    ``ties="split"`` splits each tie evenly instead.

    ``offsets``: the distractor offsets of a chosen layout (a world's ``distractor_offsets``; B's own
    offset is left out) instead of ``distractor_offsets(d')``. Scores: :func:`matched_filter_score`.
    """
    check_choice("query", query, ROUTING_EVAL_SETS)
    if ties not in ("lose", "split"):
        raise ValueError(f"unknown tie rule {ties!r}; expected 'lose' or 'split'")
    target = eval_delta or delta
    score = lambda r: matched_filter_score(d_head, delta, base, r, query)  # noqa: E731  (a key r from the mask)
    offsets = distractor_offsets(target) if offsets is None else [o for o in offsets if o != target]
    if len(offsets) < N_DISTRACTORS:
        raise ValueError(f"a layout needs at least {N_DISTRACTORS} distractor offsets other than {target}, got {offsets}")
    tied = {o: math.isclose(score(o), score(target), rel_tol=1e-9, abs_tol=1e-9) for o in offsets}
    wins = {o: score(o) < score(target) and not tied[o] for o in offsets}
    return _pair_share(wins, tied if ties == "split" else None)


def trained_offset_share(delta: int, eval_delta: int) -> float:
    """The baseline "a distractor on the trained offset wins, otherwise B" for the in-place query with B
    at ``eval_delta``: the share of distractor offset pairs with no distractor at ``delta``. It knows
    only that the route prefers offset ``delta``, not the RoPE kernel's shape."""
    return _pair_share({o: o != delta for o in distractor_offsets(eval_delta)})


def nearest_key_share(delta: int, offsets: Sequence[int] | None = None) -> float:
    """The baseline "the mask attends to the key nearest to it": the share of distractor offset pairs
    in which B (at ``delta``) is nearer to the mask than both distractors. The same for the in-place
    and the reverse prompt (mirror images); a function of the world's geometry alone. ``offsets``: a
    chosen layout's distractor offsets (default ``1 .. 2 delta + 1`` without ``delta``)."""
    return _pair_share({o: o > delta for o in (distractor_offsets(delta) if offsets is None else offsets) if o != delta})


def highest_frequency_reverse_accuracy(delta: int, offsets: Sequence[int] | None = None) -> float:
    """The matched filter of :func:`matched_filter_reverse_accuracy` with RoPE's highest frequency only,
    ``theta_0 = base^0 = 1``, the same at every base: B wins a pair iff ``cos(2 delta)`` beats ``cos(delta + o)``
    for both distractors. A rule that knows delta and the layout but not the base (the full filter with one
    frequency pair, ``d_head = 2``)."""
    return matched_filter_reverse_accuracy(2, delta, 10000.0, offsets=offsets)
