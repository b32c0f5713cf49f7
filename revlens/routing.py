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

Also here: the metrics of a trained model (:func:`routing_metrics`: accuracies, the same under a
uniform pattern at the readout position, where it attends, the same at held-out offsets), the
route-vs-storage interventions and their controls (:func:`causal_split`), the closed form's
matched-filter prediction of accuracy (:func:`matched_filter_reverse_accuracy`), the nearest-key
and trained-offset baselines (:func:`nearest_key_share`, :func:`trained_offset_share`), the filter with
RoPE's highest frequency only (:func:`highest_frequency_reverse_accuracy`), statistics over the table's cells
(:func:`within_delta_agreement`, :func:`misrouted_cells`, :func:`compare_by_delta`; correlation intervals such as
:func:`revlens.stats.correlation_ci` are in :mod:`revlens.stats`) and the sweep (:class:`RoutingSweepSpec`, :func:`run_routing_sweep`; ``revlens sweep`` dispatches on
``"family": "routing"``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor

from revlens.config import EncoderConfig, check_choice, check_file_name, check_finite, check_int, check_seeds
from revlens.objectives import OBJECTIVES
from revlens.sweep import Planned, config_hash
from revlens.training import TrainConfig, init_noise
from revlens.world import EvalSet

MASK = "[M]"
FILL = "[F]"
LAYOUTS: tuple[str, ...] = ("gaps", "fillers")
N_DISTRACTORS = 2
ROUTING_EVAL_SETS: tuple[str, ...] = ("inplace", "reverse")
A_SLOT, B_SLOT = 0, 1
"""Sequence indices of the A slot (the mask in every eval prompt) and of the fact's B."""
MASK_ID = 0
"""Token id of the mask in every routing world (``A0 ..`` follow it, then ``B0 ..``)."""
SINGLE_DISTRACTOR_STREAM = 2
"""Random stream of the distractor facts of :meth:`RoutingWorld.single_distractor_prompts` (0: training, 1: eval)."""


def alphabet_ids(kind: str, n_facts: int) -> Int[Tensor, " n_facts"]:
    """Token ids of the ``"A"`` or ``"B"`` alphabet of a routing world with ``n_facts`` facts."""
    first = {"A": 1, "B": 1 + n_facts}.get(kind)
    if first is None:
        raise ValueError(f"unknown alphabet {kind!r}; expected 'A' or 'B'")
    return torch.arange(first, first + n_facts)


@dataclass(frozen=True)
class RoutingWorld:
    """Facts (A_i, B_i), an offset ``delta`` and seeded distractor draws (see the module docstring).

    ``layout``: ``"gaps"`` (four tokens, offsets are gaps in the position ids) or ``"fillers"``
    (``2 * delta + 2`` tokens at positions 0, 1, 2, ..., a filler token at every empty position).
    ``eval_delta``: the offset of B in the *evaluation* prompts (default ``delta``); training data
    always use ``delta``. ``dataclasses.replace(world, eval_delta=d)`` evaluates at a held-out offset.
    ``distractor_offsets``: the offsets the distractors may take (sorted, distinct, without ``delta``);
    default ``None``, i.e. ``1 .. 2 * B's offset + 1`` without B's offset. With a held-out ``eval_delta``
    the distractors keep to the same offsets, less ``eval_delta`` itself.
    """

    n_facts: int
    delta: int
    seed: int
    sentences_per_fact: int
    a_ids: tuple[int, ...]
    b_ids: tuple[int, ...]
    layout: str = "gaps"
    eval_delta: int | None = None
    distractor_offsets: tuple[int, ...] | None = None

    @classmethod
    def generate(
        cls, n_facts: int = 64, delta: int = 2, seed: int = 0, sentences_per_fact: int = 16, layout: str = "gaps",
        distractor_offsets: Sequence[int] | None = None,
    ) -> "RoutingWorld":
        if not isinstance(n_facts, int) or n_facts < N_DISTRACTORS + 1:
            raise ValueError(f"a routing world needs at least {N_DISTRACTORS + 1} facts, got n_facts={n_facts!r}")
        if not isinstance(delta, int) or delta < 1:
            raise ValueError(f"delta must be a positive integer offset, got {delta!r}")
        if not isinstance(sentences_per_fact, int) or sentences_per_fact < 1:
            raise ValueError(f"sentences_per_fact must be a positive integer, got {sentences_per_fact!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
        gen = torch.Generator().manual_seed(seed)
        a_ids = tuple(1 + i for i in torch.randperm(n_facts, generator=gen).tolist())
        b_ids = tuple(1 + n_facts + i for i in torch.randperm(n_facts, generator=gen).tolist())
        offsets = None if distractor_offsets is None else tuple(distractor_offsets)
        return cls(n_facts, delta, seed, sentences_per_fact, a_ids, b_ids, layout, distractor_offsets=offsets)

    def __post_init__(self) -> None:
        if self.eval_delta is not None and (not isinstance(self.eval_delta, int) or self.eval_delta < 1):
            raise ValueError(f"eval_delta must be a positive integer offset, got {self.eval_delta!r}")
        offsets = self.distractor_offsets
        if offsets is not None:
            if not isinstance(offsets, tuple) or not all(type(o) is int and o >= 1 for o in offsets) or \
                    list(offsets) != sorted(set(offsets)):
                raise ValueError(f"distractor_offsets must be increasing distinct positive integers, got {offsets!r}")
            if self.delta in offsets:
                raise ValueError(f"distractor_offsets {list(offsets)} hold B's offset delta={self.delta}")
            target = self.eval_delta or self.delta
            if len(self.offset_choices(target)) < N_DISTRACTORS:
                raise ValueError(f"distractor_offsets {list(offsets)} leave fewer than {N_DISTRACTORS} offsets for "
                                 f"distractors with B at {target}")

    def offset_choices(self, delta: int) -> list[int]:
        """The offsets a distractor may take with B at ``delta``: the world's :attr:`distractor_offsets`
        without ``delta``, or by default ``1 .. 2 * delta + 1`` without ``delta``."""
        if self.distractor_offsets is None:
            return distractor_offsets(delta)
        return [o for o in self.distractor_offsets if o != delta]

    @property
    def eval_set_names(self) -> tuple[str, ...]:
        """``inplace`` and ``reverse``; with fillers also ``forward`` (a left-to-right model's query)."""
        return ROUTING_EVAL_SETS + (("forward",) if self.layout == "fillers" else ())

    # ---- vocabulary -------------------------------------------------------------------------
    @property
    def vocab(self) -> list[str]:
        fill = [FILL] if self.layout == "fillers" else []
        return [MASK] + [f"A{i}" for i in range(self.n_facts)] + [f"B{i}" for i in range(self.n_facts)] + fill

    @property
    def d_vocab(self) -> int:
        return len(self.vocab)

    @property
    def mask_id(self) -> int:
        return MASK_ID

    @property
    def fill_id(self) -> int:
        if self.layout != "fillers":
            raise ValueError("a world with gaps in its position ids has no filler token")
        return 1 + 2 * self.n_facts

    @property
    def chance(self) -> float:
        return 1.0 / self.n_facts

    @property
    def n_positions(self) -> int:
        """Position ids used by training and evaluation: 0 .. 2 * max(delta, eval_delta) + 1, or up to the
        largest of the :attr:`distractor_offsets` if that is farther."""
        return max(self._length(self.delta), self._length(self.eval_delta or self.delta))

    def _length(self, delta: int) -> int:
        """Positions a sentence with B at ``delta`` spans: ``2 delta + 2``, or to the farthest distractor offset."""
        return max([2 * delta + 2, *(o + 1 for o in self.offset_choices(delta))])

    def alphabet(self, kind: str) -> Int[Tensor, " n_facts"]:
        return alphabet_ids(kind, self.n_facts)

    # ---- sentences ----------------------------------------------------------------------------
    def _draw(self, n_per_fact: int, stream: int, delta: int) -> tuple[Tensor, Tensor, Tensor]:
        """Per sentence: fact index, the two distractor facts, the two distractor offsets."""
        gen = torch.Generator().manual_seed(self.seed * 1000 + stream)
        facts = torch.arange(self.n_facts).repeat_interleave(n_per_fact)
        others = self._other_facts(facts, gen, N_DISTRACTORS)
        # distractor offsets: two distinct values of the allowed offsets (by default 1 .. 2 delta + 1 but delta)
        choices = torch.tensor(self.offset_choices(delta))
        order = torch.rand(len(facts), len(choices), generator=gen).argsort(-1)[:, :N_DISTRACTORS]
        return facts, others, choices[order]

    def _other_facts(self, facts: Int[Tensor, " n"], gen: torch.Generator, k: int) -> Int[Tensor, "n k"]:
        """Per sentence, ``k`` distinct facts other than the sentence's own (uniform draws from ``gen``)."""
        scores = torch.rand(len(facts), self.n_facts, generator=gen)
        scores[torch.arange(len(facts)), facts] = 2.0  # the own fact sorts last
        return scores.argsort(-1)[:, :k]

    def _arrange(self, first: Tensor, facts: Tensor, distractors: Tensor, offsets: Tensor, delta: int, mirrored: bool,
                 length: int | None = None) -> Arranged:
        """Place ``first`` (A or the mask), B at offset ``delta`` and the distractors (``[n, k]`` facts) at
        ``offsets`` after it (``mirrored``: before it, as in a mirror). ``length``: tokens of a filler
        sentence (default: as far as B's offset and the allowed distractor offsets reach)."""
        b = torch.tensor(self.b_ids)
        entities = torch.cat([b[facts][:, None], b[distractors]], 1)  # B, D1, D2, ...
        relative = torch.cat([torch.full_like(facts, delta)[:, None], offsets], 1)  # from the A slot
        n = len(facts)
        if self.layout == "gaps":
            tokens = torch.cat([first[:, None], entities], 1)
            top = relative.max(1, keepdim=True).values if mirrored else torch.zeros_like(relative[:, :1])
            positions = torch.cat([top, top - relative if mirrored else relative], 1)
            index = torch.arange(1, 1 + entities.shape[1]).expand(n, -1)
            return Arranged(tokens, positions, A_SLOT, index[:, 0], index[:, 1:])
        length = self._length(delta) if length is None else length
        slot = length - 1 if mirrored else 0
        index = slot - relative if mirrored else relative
        tokens = torch.full((n, length), self.fill_id)
        tokens[:, slot] = first
        tokens.scatter_(1, index, entities)
        return Arranged(tokens, torch.arange(length).expand(n, -1).clone(), slot, index[:, 0], index[:, 1:])

    def training_data(self) -> tuple[Int[Tensor, "n seq"], Int[Tensor, "n seq"]]:
        """Sentences ``A B D1 D2`` with B at offset ``delta`` (``sentences_per_fact`` each) and their
        position ids: ``0, delta, o1, o2`` with gaps, ``0 .. 2 delta + 1`` with fillers."""
        facts, distractors, offsets = self._draw(self.sentences_per_fact, 0, self.delta)
        arranged = self._arrange(torch.tensor(self.a_ids)[facts], facts, distractors, offsets, self.delta, mirrored=False)
        return arranged.tokens, arranged.positions

    def training_sentences(self) -> Int[Tensor, "n seq"]:
        return self.training_data()[0]

    def eval_prompts(self, name: str) -> tuple[EvalSet, Arranged, Int[Tensor, "n 2"]]:
        """The eval set ``name``, where its B and distractors sit (sequence indices) and the
        distractors' own answers (their facts' A, or for ``forward`` their B)."""
        if name not in self.eval_set_names:
            raise ValueError(f"unknown evaluation set {name!r}; expected one of {', '.join(self.eval_set_names)}")
        delta = self.eval_delta or self.delta
        # held-out offsets draw their own distractors (stream 1 is the trained offset's)
        facts, distractors, offsets = self._draw(1, 1 if delta == self.delta else 100 + delta, delta)
        a, b = torch.tensor(self.a_ids), torch.tensor(self.b_ids)
        mask = torch.full_like(facts, self.mask_id)
        if name == "forward":  # A, then everything before B, then the mask in B's slot (fillers only)
            arranged = self._arrange(a[facts], facts, distractors, offsets, delta, mirrored=False)
            tokens = arranged.tokens[:, : delta + 1].clone()
            tokens[:, delta] = self.mask_id
            arranged = Arranged(tokens, arranged.positions[:, : delta + 1], delta, arranged.b_index, arranged.d_index)
            es = EvalSet(name, tokens, delta, b[facts], self.alphabet("B"), arranged.positions)
            return es, arranged, b[distractors]
        arranged = self._arrange(mask, facts, distractors, offsets, delta, mirrored=name == "reverse")
        es = EvalSet(name, arranged.tokens, arranged.answer_slot, a[facts], self.alphabet("A"), arranged.positions)
        return es, arranged, a[distractors]

    def single_distractor_prompts(self, query: str, offset: int) -> tuple[EvalSet, Arranged, Int[Tensor, "n 1"]]:
        """Prompts with B and **one** distractor, at ``offset`` from the mask: one per fact, like
        :meth:`eval_prompts` (B at ``eval_delta or delta``; ``query="reverse"``: everything before the
        mask, ``"inplace"``: after it), where B and the distractor sit, and the distractor's own answer.

        Each fact's distractor fact is one fixed draw (its own random stream), the same at every offset
        and in both queries, so offsets are compared on the same facts. With gaps the prompt is three
        tokens ``[M] B D``; with fillers it spans ``max(2 delta + 2, offset + 1)`` positions. Any offset
        ``>= 1`` other than B's is allowed, also ones beyond ``2 delta + 1`` (the model's context bounds it).
        """
        check_choice("query", query, ROUTING_EVAL_SETS)
        delta = self.eval_delta or self.delta
        if type(offset) is not int or offset < 1 or offset == delta:
            raise ValueError(f"a distractor offset must be a positive integer other than B's ({delta}), got {offset!r}")
        gen = torch.Generator().manual_seed(self.seed * 1000 + SINGLE_DISTRACTOR_STREAM)
        facts = torch.arange(self.n_facts)
        distractors = self._other_facts(facts, gen, 1)
        mask = torch.full_like(facts, self.mask_id)
        arranged = self._arrange(mask, facts, distractors, torch.full_like(distractors, offset), delta,
                                 mirrored=query == "reverse", length=max(2 * delta + 2, offset + 1))
        a = torch.tensor(self.a_ids)
        es = EvalSet(f"{query}_single_o{offset}", arranged.tokens, arranged.answer_slot, a[facts], self.alphabet("A"),
                     arranged.positions)
        return es, arranged, a[distractors]

    def eval_set(self, name: str) -> EvalSet:
        """One of :attr:`eval_set_names`, one prompt per fact. Its distractors are a fresh draw (their own
        random stream), not a training sentence's; a (fact, distractor) pair, even with the same offset,
        may also occur in some training sentence, since training draws many per fact."""
        return self.eval_prompts(name)[0]

    def decode(self, tokens: Int[Tensor, "... seq"], positions: Int[Tensor, "... seq"] | None = None) -> list[str]:
        """Token ids to strings, ``token@position`` when positions are given."""
        vocab = self.vocab
        rows = tokens.reshape(-1, tokens.shape[-1]).tolist()
        if positions is None:
            return [" ".join(vocab[t] for t in row) for row in rows]
        pos = positions.reshape(-1, positions.shape[-1]).tolist()
        return [" ".join(f"{vocab[t]}@{p}" for t, p in zip(row, prow)) for row, prow in zip(rows, pos)]

    def to_dict(self) -> dict[str, Any]:
        """The world's defining fields (``distractor_offsets`` only when set, so a default world's is unchanged)."""
        out = {"family": "routing", "n_facts": self.n_facts, "delta": self.delta, "seed": self.seed,
               "sentences_per_fact": self.sentences_per_fact, "layout": self.layout}
        if self.distractor_offsets is not None:
            out["distractor_offsets"] = list(self.distractor_offsets)
        return out


@dataclass(frozen=True)
class Arranged:
    """Prompts or sentences of a routing world and where their parts sit (sequence indices)."""

    tokens: Int[Tensor, "n seq"]
    positions: Int[Tensor, "n seq"]
    answer_slot: int
    b_index: Int[Tensor, " n"]
    d_index: Int[Tensor, "n n_distractors"]


def distractor_offsets(delta: int) -> list[int]:
    """The offsets a distractor may take for ``delta``: 1 .. 2 * delta + 1 without ``delta``."""
    return [o for o in range(1, 2 * delta + 2) if o != delta]


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


def _query_row(es: EvalSet, objective: str) -> int:
    from revlens.objectives import READOUTS
    from revlens.readout import read_position

    return int(read_position(es.mask_pos, READOUTS[objective]))


@dataclass(frozen=True)
class MaskRow:
    """A forward pass's logits and layer-0 attention at the readout position of a set's prompts (heads kept apart)."""

    logits: Float[Tensor, "batch vocab"]
    on_b: Float[Tensor, "batch head"]
    """Attention weight on B."""
    on_d: Float[Tensor, "batch head n_distractors"]
    """Attention weight on each distractor."""
    score_b: Float[Tensor, "batch head"]
    """Pre-softmax score on B."""


@torch.no_grad()
def mask_row(model, es: EvalSet, arranged: Arranged, objective: str) -> MaskRow | None:
    """Logits and layer-0 attention at the readout position of ``es`` (the mask's, or the one before it for a
    next-token model); ``None`` where the set has no readout position."""
    row = _query_row(es, objective)
    if row < 0:
        return None
    logits, cache = model.run_with_cache(
        es.prompts, positions=es.positions, names_filter=lambda n: n in ("blocks.0.attn.hook_pattern", "blocks.0.attn.hook_attn_scores")
    )
    batch = torch.arange(len(es.prompts))
    pattern = cache["blocks.0.attn.hook_pattern"][:, :, row]  # [batch, head, key]
    on_d = pattern.gather(2, arranged.d_index[:, None, :].expand(-1, pattern.shape[1], -1))
    return MaskRow(logits[:, row], pattern[batch, :, arranged.b_index], on_d,
                   cache["blocks.0.attn.hook_attn_scores"][batch, :, row, arranged.b_index])


@torch.no_grad()
def route_statistics(model, world: RoutingWorld, objective: str = "inplace") -> dict[str, float]:
    """Where the answer's readout position attends (layer 0) in each eval set, and how the two routes' scores agree.

    The readout position is the mask's (the one before it for a next-token model).
    ``{set}_attn_b`` / ``{set}_attn_d``: mean attention weight on B / on a distractor (mean over
    heads, prompts and the two distractors). ``{set}_attn_b_top``: the same on B for the head that
    attends most to B in the *in-place* set (chosen there, so the reverse number is not selected on
    itself). ``score_corr``: per head, the Pearson correlation over prompts (facts) of the mask-to-B
    pre-softmax score in the in-place prompt and in its mirror image, averaged over heads -- the
    within-head agreement of the two routes' scores that tr R(2 delta) / d describes for shared
    W_Q, W_K at initialisation (pooling heads would let differences between heads dominate). NaN
    where a set has no readout position (the in-place query of a next-token model).
    """
    out: dict[str, float] = {}
    scores = {}
    top_head = None
    for name in ROUTING_EVAL_SETS:
        read = mask_row(model, *world.eval_prompts(name)[:2], objective)
        if read is None:
            out.update({f"{name}_{m}": math.nan for m in ("attn_b", "attn_d", "attn_b_top")})
            continue
        scores[name] = read.score_b  # [batch, head]
        on_b, on_d = read.on_b.mean(0), read.on_d  # on B per head; on each distractor
        if top_head is None and name == "inplace":
            top_head = int(on_b.argmax())
        out[f"{name}_attn_b"] = on_b.mean().item()
        out[f"{name}_attn_d"] = on_d.mean().item()
        out[f"{name}_attn_b_top"] = math.nan if top_head is None else on_b[top_head].item()
    pair = [scores.get(n) for n in ROUTING_EVAL_SETS]
    if any(p is None for p in pair):
        out["score_corr"] = math.nan
    else:
        per_head = [torch.corrcoef(torch.stack([pair[0][:, h], pair[1][:, h]]))[0, 1] for h in range(pair[0].shape[1])]
        out["score_corr"] = torch.stack(per_head).nanmean().item()
    return out


HELD_OUT: tuple[tuple[str, int], ...] = (("dm1", -1), ("dp1", +1))
"""Held-out evaluation offsets: ``(suffix, change)``, B at ``delta + change`` in the eval prompts."""
HELD_OUT_METRICS: tuple[str, ...] = ("inplace_acc", "reverse_acc", "forward_acc", "inplace_attn_b", "reverse_attn_b", "reverse_attn_d")


def held_out_offsets(delta: int) -> dict[str, int]:
    """``{suffix: offset}`` of the held-out offsets that exist for ``delta`` and fit :data:`N_CTX`."""
    return {suffix: delta + change for suffix, change in HELD_OUT if delta + change >= 1 and 2 * (delta + change) + 2 <= N_CTX}


def routing_metrics(model, world: RoutingWorld, objective: str) -> dict[str, float]:
    """Answer metrics per eval set, the same under a uniform mask pattern, :func:`route_statistics`,
    and at the held-out offsets ``delta -/+ 1`` (suffixes ``_dm1`` / ``_dp1``; NaN where none exists, or
    where a world's chosen ``distractor_offsets`` leave fewer than two offsets besides it)."""
    from revlens.evaluation import evaluate, evaluate_under_control

    out = {
        **evaluate(model, world, objective),  # type: ignore[arg-type]
        **evaluate_under_control(model, world, objective, "uniform", sets=world.eval_set_names),  # type: ignore[arg-type]
        **route_statistics(model, world, objective),
    }
    offsets = {suffix: d for suffix, d in held_out_offsets(world.delta).items()
               if len(world.offset_choices(d)) >= N_DISTRACTORS}
    for suffix, _ in HELD_OUT:
        if suffix in offsets:
            shifted = dataclasses.replace(world, eval_delta=offsets[suffix])
            metrics = {**evaluate(model, shifted, objective), **route_statistics(model, shifted, objective)}  # type: ignore[arg-type]
        else:
            metrics = {}
        out.update({f"{key}_{suffix}": metrics.get(key, math.nan) for key in HELD_OUT_METRICS})
    return out


@torch.no_grad()
def causal_split(model, world: RoutingWorld) -> dict[str, float]:
    """Route vs storage in the reverse query of a one-layer model, by interventions and their controls.

    ``reverse_acc``: the model's own reverse accuracy. ``route_patched_acc``: reverse accuracy after
    writing, in every head, the mask-to-B pre-softmax score of the *in-place* prompt into the reverse
    prompt (``blocks.0.attn.hook_attn_scores``, query = mask, key = B; the distractors keep their own
    scores): if this restores the answer, what the reverse query lacked was the route, and the stored
    B -> A mapping was there to be read. ``row_patched_acc``: the in-place prompt's whole mask row
    written in (the scores on the mask itself, B and both distractors, each onto the same token's key;
    with fillers the filler keys keep theirs): where the B-only patch restores part of the answer, the
    difference is what the distractors' scores carry. In a one-layer, attention-only RoPE model on the
    gap layout the two prompts hold the same tokens, so this patch makes the mask's output the in-place
    prompt's: it must give in-place accuracy, a check of the patch rather than a finding. Specificity control: ``decoy_patched_acc`` /
    ``decoy_patched_decoy_acc`` write the same score onto the first *distractor's* key instead (B keeps
    its own): a route patch that works through the key it targets gives that distractor's A
    (``..._decoy_acc``), not B's. ``head{h}_ablated_acc``: reverse accuracy with head h's value
    vectors zeroed (``blocks.0.attn.hook_v``); ``all_heads_ablated_acc``: every head's values zeroed,
    the floor; ``patched_head{h}_ablated_acc`` / ``patched_all_heads_ablated_acc``: the same on the
    route-patched prompt (does the patched answer go through the same heads' values?).
    """
    from revlens.evaluation import answer_metrics

    inplace, in_keys, _ = world.eval_prompts("inplace")
    reverse, rev_keys, decoy_answers = world.eval_prompts("reverse")
    score_hook, value_hook = "blocks.0.attn.hook_attn_scores", "blocks.0.attn.hook_v"
    _, cache = model.run_with_cache(inplace.prompts, positions=inplace.positions, names_filter=score_hook)
    batch = torch.arange(len(inplace.prompts))
    inplace_row = cache[score_hook][:, :, inplace.mask_pos]  # [batch, head, key]
    inplace_scores = inplace_row[batch, :, in_keys.b_index]  # [batch, head]
    def entities(keys: Arranged, mask_pos: int) -> Int[Tensor, "batch 4"]:  # the mask, B, D1, D2
        return torch.cat([torch.full_like(keys.b_index, mask_pos)[:, None], keys.b_index[:, None], keys.d_index], 1)

    in_entities, rev_entities = entities(in_keys, inplace.mask_pos), entities(rev_keys, reverse.mask_pos)
    decoy = dataclasses.replace(reverse, answers=decoy_answers[:, 0])

    def accuracies(hooks, sets=(reverse,)) -> list[float]:
        logits = model.run_with_hooks(reverse.prompts, positions=reverse.positions, fwd_hooks=hooks)[:, reverse.mask_pos]
        return [answer_metrics(logits, es)["acc"] for es in sets]

    def patch(key: Tensor):
        def hook(scores: Tensor, hook=None) -> Tensor:  # noqa: ARG001
            scores = scores.clone()
            scores[batch, :, reverse.mask_pos, key] = inplace_scores
            return scores

        return (score_hook, hook)

    def patch_row(scores: Tensor, hook=None) -> Tensor:  # noqa: ARG001
        scores = scores.clone()
        for column in range(in_entities.shape[1]):
            scores[batch, :, reverse.mask_pos, rev_entities[:, column]] = inplace_row[batch, :, in_entities[:, column]]
        return scores

    def ablate(heads: Sequence[int]):
        def hook(v: Tensor, hook=None) -> Tensor:  # noqa: ARG001
            v = v.clone()
            v[:, :, list(heads)] = 0.0
            return v

        return (value_hook, hook)

    route = patch(rev_keys.b_index)
    every = range(model.cfg.n_heads)
    out = {"reverse_acc": accuracies([])[0], "route_patched_acc": accuracies([route])[0],
           "row_patched_acc": accuracies([(score_hook, patch_row)])[0]}
    out["decoy_patched_acc"], out["decoy_patched_decoy_acc"] = accuracies([patch(rev_keys.d_index[:, 0])], (reverse, decoy))
    for prefix, base in (("", []), ("patched_", [route])):
        for head in every:
            out[f"{prefix}head{head}_ablated_acc"] = accuracies([*base, ablate([head])])[0]
        out[f"{prefix}all_heads_ablated_acc"] = accuracies([*base, ablate(list(every))])[0]
    return out

# ---- the sweep ----------------------------------------------------------------------------------
ROW_METRICS: tuple[str, ...] = (
    tuple(f"{s}_{m}" for s in (*ROUTING_EVAL_SETS, "forward") for m in ("acc", "acc_in_type", "logp", "margin", "acc_uniform", "acc_in_type_uniform"))
    + tuple(f"{s}_{m}" for s in ROUTING_EVAL_SETS for m in ("attn_b", "attn_d", "attn_b_top"))
    + ("score_corr",)
    + tuple(f"{m}_{suffix}" for suffix, _ in HELD_OUT for m in HELD_OUT_METRICS)
)
"""The metrics each sweep row keeps (see :func:`routing_metrics`; ``forward_*`` only with fillers)."""
N_CTX = 68
"""Position ids the sweep's models accept: enough for delta = 32 and its held-out offset 33 (ids up to 67)."""


@dataclass(frozen=True)
class RoutingCell:
    """One arm of the routing sweep: an objective and model changes, at several offsets and RoPE bases."""

    name: str
    objective: str
    model: dict[str, Any]
    deltas: tuple[int, ...]
    bases: tuple[float, ...] = (10000.0,)
    group: str = ""
    layout: str = "gaps"
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Changes to the sweep's training settings for this cell (e.g. more steps)."""
    shift_positions: bool = False
    """Train with a random shift added to each sentence's position ids (``train_stack(shift_positions=True)``)."""
    stack_size: int | None = None
    """Models per stack for this cell (default: the sweep's). Untied projections gather one matrix per
    token, which trains faster one model at a time than vmapped (``bench/routing_stack.py --cell``)."""
    distractor_offsets: tuple[int, ...] | None = None
    """The offsets distractors may take, in training and evaluation (:class:`RoutingWorld`); ``None``, the
    default, keeps ``1 .. 2 delta + 1`` without delta and leaves the cell's config hash what it was."""

    def model_cfg(self, world: RoutingWorld, base: float) -> EncoderConfig:
        from revlens.experiments import BASE_MODEL

        fields = {**BASE_MODEL, "attention_dir": "bidirectional", **self.model, "rotary_base": float(base)}
        return EncoderConfig(d_vocab=world.d_vocab, n_ctx=N_CTX, **fields)


def _positive_ints(label: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(type(v) is int and v >= 1 for v in value):
        raise ValueError(f"{label} must be a non-empty list of positive integers, got {value!r}")
    return tuple(value)


def _cell_from_dict(index: int, entry: Any) -> RoutingCell:
    """One entry of a routing sweep file's ``cells`` list, every field checked, errors naming the cell."""
    if not isinstance(entry, dict):
        raise ValueError(f"cells[{index}] must be a JSON object, got {entry!r}")
    label = f"cell {index} ({entry.get('name')!r})"
    extra = set(entry) - {"name", "objective", "model", "deltas", "bases", "group", "layout", "train", "stack_size",
                          "shift_positions", "distractor_offsets"}
    if extra or not {"name", "objective", "deltas"} <= set(entry):
        raise ValueError(f"{label} needs name, objective, deltas; unknown keys {sorted(extra)}")
    for key in ("name", "objective"):
        if not isinstance(entry[key], str) or not entry[key]:
            raise ValueError(f"{label}: {key!r} must be a non-empty string, got {entry[key]!r}")
    check_choice("objective", entry["objective"], OBJECTIVES)
    for key in ("model", "train"):
        if not isinstance(entry.get(key, {}), dict):
            raise ValueError(f"{label}: {key!r} must be a JSON object, got {entry[key]!r}")
    if not isinstance(entry.get("group", ""), str):
        raise ValueError(f"{label}: 'group' must be a string, got {entry['group']!r}")
    if not isinstance(entry.get("shift_positions", False), bool):
        raise ValueError(f"{label}: 'shift_positions' must be true or false, got {entry['shift_positions']!r}")
    bases = entry.get("bases", [10000.0])
    if not isinstance(bases, list) or not bases:
        raise ValueError(f"{label}: 'bases' must be a non-empty list of RoPE bases, got {bases!r}")
    for base in bases:
        check_finite(f"{label}: RoPE base", base, 1, strict=True)
    layout = entry.get("layout", "gaps")
    if layout not in LAYOUTS:
        raise ValueError(f"{label}: unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    stack_size = entry.get("stack_size")
    if stack_size is not None:
        check_int(f"{label}: stack_size", stack_size, 1)
    offsets = entry.get("distractor_offsets")
    if offsets is not None:
        offsets = _positive_ints(f"{label}: 'distractor_offsets'", offsets)
    return RoutingCell(entry["name"], entry["objective"], dict(entry.get("model", {})),
                       _positive_ints(f"{label}: 'deltas'", entry["deltas"]), tuple(float(b) for b in bases),
                       entry.get("group", ""), layout, dict(entry.get("train", {})), entry.get("shift_positions", False),
                       stack_size, offsets)


Job = tuple[RoutingCell, int, float, int]
"""(cell, delta, RoPE base, seed): one model of a routing sweep."""


@dataclass(frozen=True)
class RoutingSweepSpec:
    """A routing sweep file (``"family": "routing"``): world size, training settings, seeds, cells.

    Seed s trains model seed s on the world with seed s (own facts, own distractor draws). A row per
    model, keyed by (cell, delta, base, seed); :func:`revlens.sweep.run_table` runs it (provenance,
    stale-row refusal, ``--redo``, atomic writes, torn-line recovery), like an ablation sweep."""

    name: str
    world: dict[str, Any]
    train: TrainConfig
    seeds: tuple[int, ...]
    cells: tuple[RoutingCell, ...]
    stack_size: int = 50
    key_fields: ClassVar[tuple[str, ...]] = ("cell", "delta", "base", "seed")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RoutingSweepSpec":
        if not isinstance(data, dict):
            raise ValueError(f"a routing sweep file holds a JSON object, got {type(data).__name__}")
        allowed = {"name", "family", "world", "train", "seeds", "cells", "stack_size"}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"routing sweep file has unknown keys {sorted(unknown)}")
        for key in ("world", "train"):
            if not isinstance(data.get(key, {}), dict):
                raise ValueError(f"routing sweep file: {key!r} must be a JSON object, got {data[key]!r}")
        world_keys = set(data.get("world", {})) - {"n_facts", "sentences_per_fact"}
        if world_keys:
            raise ValueError(f"routing sweep file: unknown 'world' keys {sorted(world_keys)}; expected n_facts, "
                             "sentences_per_fact (each cell sets the offset, seed and layout)")
        if not isinstance(data.get("cells"), list) or not data["cells"]:
            raise ValueError(f"routing sweep file: 'cells' must be a non-empty list of cells, got {data.get('cells')!r}")
        cells = [_cell_from_dict(i, entry) for i, entry in enumerate(data["cells"])]
        if len({c.name for c in cells}) != len(cells):
            raise ValueError("a routing sweep needs cells with unique names")
        for cell in cells:
            if max(cell.deltas) * 2 + 2 > N_CTX:
                raise ValueError(f"cell {cell.name!r}: delta {max(cell.deltas)} needs more than n_ctx={N_CTX} position ids")
            if cell.distractor_offsets and max(cell.distractor_offsets) >= N_CTX:
                raise ValueError(f"cell {cell.name!r}: distractor offset {max(cell.distractor_offsets)} needs more than "
                                 f"n_ctx={N_CTX} position ids")
            if (cell.objective == "arm") != (cell.model.get("attention_dir") == "causal"):
                raise ValueError(f"cell {cell.name!r}: the next-token objective 'arm' goes with a causal model "
                                 "(\"model\": {\"attention_dir\": \"causal\"}) and only with it")
            if cell.objective == "arm" and cell.layout != "fillers":
                raise ValueError(f"cell {cell.name!r}: the next-token objective 'arm' needs \"layout\": \"fillers\" "
                                 "(text in position order); with gaps the next sequence index is not the next position")
        try:
            train = TrainConfig.from_dict({"log_every": data.get("train", {}).get("steps", 2000), **data.get("train", {})})
        except (TypeError, ValueError) as err:
            raise ValueError(f"routing sweep file: bad 'train': {err}") from None
        stack_size = data.get("stack_size", 50)
        check_int("stack_size", stack_size, 1)
        spec = cls(check_file_name("routing sweep name", data.get("name")), dict(data.get("world", {})), train,
                   check_seeds(data.get("seeds")), tuple(cells), stack_size)
        for cell in cells:  # a bad override fails now, not after the other cells have trained
            if "objective" in cell.train:
                raise ValueError(f"cell {cell.name!r}: set the objective with the cell's 'objective', not in its 'train'")
            try:
                spec.train_for(cell)
            except (TypeError, ValueError) as err:
                raise ValueError(f"cell {cell.name!r}: bad 'train' override: {err}") from None
            try:
                world = spec.world_for(cell.deltas[0], spec.seeds[0], cell.layout, cell.distractor_offsets)
                cell.model_cfg(world, cell.bases[0])
            except (TypeError, ValueError) as err:
                raise ValueError(f"cell {cell.name!r}: bad 'model' override or world: {err}") from None
            if cell.distractor_offsets is not None:  # a layout must hold at every offset of the cell
                try:
                    for delta in cell.deltas:
                        spec.world_for(delta, spec.seeds[0], cell.layout, cell.distractor_offsets)
                except ValueError as err:
                    raise ValueError(f"cell {cell.name!r}: bad 'distractor_offsets': {err}") from None
        return spec

    def jobs(self) -> list[Job]:
        """Every (cell, delta, base, seed) in file order."""
        return [(c, d, b, s) for c in self.cells for d in c.deltas for b in c.bases for s in self.seeds]

    def world_for(self, delta: int, seed: int, layout: str = "gaps",
                  distractor_offsets: Sequence[int] | None = None) -> RoutingWorld:
        return RoutingWorld.generate(delta=delta, seed=seed, layout=layout, distractor_offsets=distractor_offsets,
                                     **self.world)

    def train_for(self, cell: RoutingCell) -> TrainConfig:
        """The file's training settings with the cell's objective (the file's own ``train`` has none) and
        the cell's own changes."""
        return dataclasses.replace(self.train, objective=cell.objective, **cell.train)

    # ---- the sweep engine's plan (revlens.sweep.SweepPlan) ----
    def config(self, job: Job) -> str:
        """Hash of what determines one model's numbers: model and training configs, world, position shifts."""
        cell, delta, base, seed = job
        world = self.world_for(delta, seed, cell.layout, cell.distractor_offsets)
        layout = {} if cell.distractor_offsets is None else {"distractor_offsets": list(cell.distractor_offsets)}
        return config_hash({"model": cell.model_cfg(world, base).to_dict(), "train": self.train_for(cell).to_dict(),
                            "world": {**self.world, "delta": delta, "seed": seed, "layout": cell.layout, **layout},
                            "shift_positions": cell.shift_positions, "init_noise": init_noise()})

    def planned(self) -> list[Planned]:
        return [Planned((job[0].name, job[1], job[2], job[3]), self.config(job), {"group": job[0].group})
                for job in self.jobs()]

    def tasks(self, todo: Sequence[Planned]) -> list[tuple[Any, ...]]:
        """Stacks of models to train together: one cell each, one sentence length (fillers: 2 delta + 2
        tokens), at most the cell's (else the file's) stack size."""
        wanted = {p.key for p in todo}
        chunks: list[list[Job]] = []
        for job in self.jobs():
            if (job[0].name, job[1], job[2], job[3]) not in wanted:
                continue
            if chunks and chunks[-1][0][0] is job[0] and len(chunks[-1]) < (job[0].stack_size or self.stack_size) and (
                job[0].layout == "gaps" or chunks[-1][0][1] == job[1]
            ):
                chunks[-1].append(job)
            else:
                chunks.append([job])
        return [(self, chunk) for chunk in chunks]

    def cost(self, task: tuple[Any, ...]) -> float:
        """Rough training cost of a stack (steps x sentence length x models), to start the longest first."""
        chunk = task[1]
        cell, delta = chunk[0][0], chunk[0][1]
        length = 2 * delta + 2 if cell.layout == "fillers" else 2 + N_DISTRACTORS
        return self.train_for(cell).steps * length * len(chunk)

    @property
    def worker(self):
        return train_rows


def train_rows(spec: RoutingSweepSpec, jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """Train ``jobs`` (all of one cell) as one stack and return their table rows (without provenance)."""
    from revlens.stack import Member, train_stack
    from revlens.theory import rope_score_correlation

    cell = jobs[0][0]
    members = []
    for _, delta, base, seed in jobs:
        world = spec.world_for(delta, seed, cell.layout, cell.distractor_offsets)
        members.append(Member(cell.model_cfg(world, base), world, seed))
    models = train_stack(members, spec.train_for(cell), progress=False, shift_positions=cell.shift_positions)
    rows = []
    for (_, delta, base, seed), member, model in zip(jobs, members, models):
        cfg = member.model_cfg
        metrics = routing_metrics(model, member.world, cell.objective)
        rotary = cfg.positional == "rotary"
        rows.append({
            "cell": cell.name, "group": cell.group, "objective": cell.objective, "positional": cfg.positional,
            "layout": cell.layout, "untied": "".join(cfg.untied_positions),
            "d_head": cfg.d_head, "delta": delta, "base": base, "seed": seed,
            "closed_form": float(rope_score_correlation(cfg.d_head, delta, base)) if rotary else None,
            "distractor_guess": 1.0 / (1 + N_DISTRACTORS), "chance": member.world.chance,
            **{k: None if math.isnan(metrics.get(k, math.nan)) else round(metrics[k], 6) for k in ROW_METRICS},
            **({} if cell.distractor_offsets is None else {"distractor_offsets": list(cell.distractor_offsets)}),
        })
    return rows


def run_routing_sweep(spec: RoutingSweepSpec, out: str | Path, progress: bool = True, jobs: int = 1,
                      redo: bool = False) -> Path:
    """Train every (cell, delta, base, seed) not yet in ``out`` (JSON lines), a stack per chunk of a cell.

    The sweep engine :func:`revlens.sweep.run_table` does the rest: rows carry provenance, a resume
    keeps only rows this file and library would write (others refused, or retrained with ``redo``),
    writes are atomic, a torn last line is dropped with a warning. ``jobs > 1`` trains that many stacks
    at once in worker processes (longest first); the table equals a one-process run's.
    """
    from revlens.sweep import run_table

    return run_table(spec, out, progress=progress, jobs=jobs, redo=redo)


def read_table(path: str | Path):
    """The sweep table as a DataFrame (one row per model)."""
    import pandas as pd

    return pd.read_json(path, lines=True)


# ---- statistics over the table's cells -----------------------------------------------------------
def within_delta_agreement(deltas: Sequence[int], predicted: Sequence[float], measured: Sequence[float],
                           n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """How much of a per-cell predictor's fit to measured cell means is more than the pattern in delta.

    One entry per (delta, base) cell. ``delta_only_r``: Pearson of ``measured`` with its own mean per delta,
    the largest Pearson any rule that reads delta but not the base can reach (the correlation ratio);
    ``predicted_r``: Pearson of ``predicted`` with ``measured``. The within-delta test uses only the deltas
    where ``predicted`` is not the same for every cell (``within_deltas``): ``within_r`` is the Pearson, over
    those cells (``n_within``), of each side's deviation from its mean at the cell's delta, with a percentile
    bootstrap interval that resamples deltas (``within_low``, ``within_high``; a delta's deviations sum to
    zero, so its cells are not independent); ``pairs_concordant`` / ``pairs_discordant``: pairs of cells at
    one delta that ``predicted`` orders strictly and ``measured`` orders the same / the other way
    (``pairs_tied``: ``measured`` equal); ``pairs_unordered``: pairs ``predicted`` scores equally."""
    import numpy as np

    d, x, y = (np.asarray(v, dtype=float) for v in (deltas, predicted, measured))
    if not d.shape == x.shape == y.shape or d.ndim != 1:
        raise ValueError(f"need one delta, prediction and measurement per cell, got {d.shape}, {x.shape}, {y.shape}")
    groups = {k: np.flatnonzero(d == k) for k in np.unique(d)}
    centred = {k: (x[i] - x[i].mean(), y[i] - y[i].mean()) for k, i in groups.items()}
    y_by_delta = np.array([y[groups[k]].mean() for k in d])
    within = [k for k, (dx, _) in centred.items() if np.ptp(dx) > 1e-12]
    if len(within) < 2:
        raise ValueError(f"the prediction differs within fewer than 2 deltas ({within}): no within-delta test")
    r = lambda keys: float(np.corrcoef(np.concatenate([centred[k][0] for k in keys]),  # noqa: E731
                                       np.concatenate([centred[k][1] for k in keys]))[0, 1])
    gen, draws = np.random.default_rng(seed), []
    for _ in range(n_boot):
        keys = [within[i] for i in gen.integers(len(within), size=len(within))]
        if len(set(keys)) > 1:
            draws.append(r(keys))
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    pairs = {"concordant": 0, "discordant": 0, "tied": 0, "unordered": 0}
    for i in groups.values():
        for a, b in ((a, b) for n, a in enumerate(i) for b in i[n + 1:]):
            dx, dy = x[a] - x[b], y[a] - y[b]
            pairs["unordered" if abs(dx) <= 1e-12 else "tied" if dy == 0 else "concordant" if dx * dy > 0 else "discordant"] += 1
    return {"delta_only_r": float(np.corrcoef(y_by_delta, y)[0, 1]), "predicted_r": float(np.corrcoef(x, y)[0, 1]),
            "within_r": r(within), "within_low": float(low), "within_high": float(high),
            "within_deltas": [int(k) if float(k).is_integer() else float(k) for k in within],
            "n_within": int(sum(len(groups[k]) for k in within)), **{f"pairs_{k}": v for k, v in pairs.items()}}


def misrouted_cells(rows: Any, guess: float = 1 / 3):
    """Per (base, delta) cell of routing table rows (a DataFrame, one row per model): the reverse accuracy's
    mean and its largest value over seeds, the reverse query's mean attention on B and on each distractor;
    ``below_guess``: every seed answers the reverse query below ``guess`` (default 1/3, a guess among B and
    its two distractors), and ``misrouted``: below the guess while the mask attends more to each distractor
    than to B (the reverse route is sent to a distractor, not merely spread out)."""
    cells = rows.groupby(["base", "delta"]).agg(
        n=("seed", "size"), reverse=("reverse_acc", "mean"), reverse_max=("reverse_acc", "max"),
        attn_b=("reverse_attn_b", "mean"), attn_d=("reverse_attn_d", "mean")).reset_index()
    cells["below_guess"] = cells.reverse_max < guess
    cells["misrouted"] = cells.below_guess & (cells.attn_d > cells.attn_b)
    return cells


def compare_by_delta(first: Any, second: Any, column: str):
    """Two sets of routing rows (DataFrames, one row per model) side by side per delta they share: each
    side's mean of ``column`` over its models and the half-width of its 95% Student-t interval
    (:func:`revlens.stats.mean_ci`), and ``apart``: the two intervals do not overlap."""
    import pandas as pd

    from revlens.stats import mean_ci

    out = []
    for delta in sorted(set(first.delta) & set(second.delta)):
        (m1, h1), (m2, h2) = (mean_ci(rows.loc[rows.delta == delta, column]) for rows in (first, second))
        out.append({"delta": int(delta), "mean_first": m1, "half_first": h1, "mean_second": m2, "half_second": h2,
                    "apart": bool(m1 - h1 > m2 + h2 or m2 - h2 > m1 + h1)})
    return pd.DataFrame(out).set_index("delta")
