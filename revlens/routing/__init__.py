"""The routing world: facts whose answer can only be found by attending to the right offset.

In :class:`revlens.world.ReversalWorld` every prompt holds one entity, so *any* attention on it
carries the fact and the route is never tested. Here every prompt holds the fact's B **and two
distractors of B's type** (other facts' Bs), each at its own offset from the A slot; a model that
attends to a distractor answers that distractor's A. Only position tells B from the distractors.

Sentences are four tokens ``A B D1 D2`` with *position ids* (not filler tokens) carrying the
geometry: A at 0, B at ``delta``, the distractors at two distinct offsets drawn from
``1 .. 2 * delta + 1`` without ``delta`` (fresh draw per sentence). Every entity of a training
sentence sits after A: no sentence places a fact's B (or any B) before the A slot, so nothing
trains the -delta direction directly. ``layout="fillers"`` writes the same sentences out in full,
``2 * delta + 2`` tokens at positions ``0 .. 2 * delta + 1`` with a filler token ``[F]`` at every
empty position (text that runs left to right, for a next-token model).

=================  =======================================  ========================================
name               prompt (positions) -> answer             meaning
=================  =======================================  ========================================
inplace            [M]@0 B@d D@o1 D@o2 -> A                 the trained query, fresh distractors
reverse            [M]@x B@x-d D@x-o1 D@x-o2 -> A           its mirror image: everything before the
                                                            mask, B at -d (never trained)
forward (fillers)  A@0 ... [M]@d -> B                       a training sentence cut at B's slot: a
                                                            next-token model's trained query
=================  =======================================  ========================================

With gaps, ``x = max(d, o1, o2)`` so ids start at 0, the mask is sequence index 0 and B index 1, and
only the position ids differ; with fillers the reverse mask is the last token (``x = 2d + 1``), so a
next-token model predicts A as the next token. ``dataclasses.replace(world, eval_delta=d')`` builds
the same queries with B at a held-out offset ``d'`` (distractors drawn as for ``d'``). Chance within
the answer's alphabet is 1 / n_facts, and a model that cannot tell B from the distractors is right
about a third of the time (1 / (1 + n_distractors)).

``RoutingWorld.generate(..., distractor_offsets=(o1, o2, ...))`` fixes the offsets the distractors may
take (in training and evaluation) instead of ``1 .. 2 * delta + 1`` without ``delta``: a chosen layout,
e.g. one that keeps every distractor off the offsets where a route's reverse filter would prefer a
distractor to B (:mod:`revlens.routing_flips`). :meth:`RoutingWorld.single_distractor_prompts` builds
prompts with one distractor at one chosen offset (:mod:`revlens.routing_offsets`).

Submodules (imports run one way: ``world`` <- ``predictors``, ``measures`` <- ``sweep``; ``cells`` needs none):

* :mod:`revlens.routing.world`: the world (:class:`RoutingWorld`, :class:`Arranged`, :func:`alphabet_ids`,
  :func:`distractor_offsets`, constants such as :data:`N_DISTRACTORS`, :data:`MASK_ID`, :data:`A_SLOT`).
* :mod:`revlens.routing.predictors`: the closed form's matched-filter prediction of accuracy
  (:func:`rope_kernel`, :func:`matched_filter_score`, :func:`matched_filter_reverse_accuracy`), the nearest-key
  and trained-offset baselines (:func:`nearest_key_share`, :func:`trained_offset_share`), the filter with
  RoPE's highest frequency only (:func:`highest_frequency_reverse_accuracy`).
* :mod:`revlens.routing.measures`: the metrics of a trained model (:func:`routing_metrics`: accuracies, the
  same under a uniform pattern at the readout position, where it attends (:func:`route_statistics`,
  :func:`mask_row`), the same at held-out offsets (:func:`held_out_offsets`)), the route-vs-storage
  interventions and their controls (:func:`causal_split`; at any depth, where storage can fail,
  :func:`storage_split`), and :data:`N_CTX`, the position ids the sweep's models accept (the held-out offsets
  must fit it).
* :mod:`revlens.routing.sweep`: the sweep (:class:`RoutingSweepSpec`, :func:`run_routing_sweep`,
  :func:`train_rows`, :data:`ROW_METRICS`; ``revlens sweep`` dispatches on ``"family": "routing"``).
* :mod:`revlens.routing.cells`: statistics over the table's cells (:func:`within_delta_agreement`,
  :func:`misrouted_cells`, :func:`compare_by_delta`; correlation intervals such as
  :func:`revlens.stats.correlation_ci` are in :mod:`revlens.stats`).

The names below are re-exported here, so ``from revlens.routing import RoutingWorld`` keeps working.
"""

from revlens.routing.cells import compare_by_delta, misrouted_cells, within_delta_agreement
from revlens.routing.measures import (N_CTX, causal_split, held_out_offsets, mask_row, routing_metrics,
                                      storage_split)
from revlens.routing.predictors import (highest_frequency_reverse_accuracy, matched_filter_reverse_accuracy,
                                        matched_filter_score, nearest_key_share, rope_kernel, trained_offset_share)
from revlens.routing.sweep import ROW_METRICS, RoutingSweepSpec, run_routing_sweep, train_rows
from revlens.routing.world import (A_SLOT, B_SLOT, MASK_ID, N_DISTRACTORS, ROUTING_EVAL_SETS, RoutingWorld,
                                   alphabet_ids, distractor_offsets)

__all__ = [
    "A_SLOT",
    "B_SLOT",
    "MASK_ID",
    "N_CTX",
    "N_DISTRACTORS",
    "ROUTING_EVAL_SETS",
    "ROW_METRICS",
    "RoutingSweepSpec",
    "RoutingWorld",
    "alphabet_ids",
    "causal_split",
    "storage_split",
    "compare_by_delta",
    "distractor_offsets",
    "held_out_offsets",
    "highest_frequency_reverse_accuracy",
    "mask_row",
    "matched_filter_reverse_accuracy",
    "matched_filter_score",
    "misrouted_cells",
    "nearest_key_share",
    "rope_kernel",
    "routing_metrics",
    "run_routing_sweep",
    "train_rows",
    "trained_offset_share",
    "within_delta_agreement",
]
