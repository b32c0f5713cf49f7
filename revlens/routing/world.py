"""The routing world: facts, sentences with position ids, evaluation prompts among same-type distractors.

See :mod:`revlens.routing` for the world's layout (offsets, the ``gaps`` and ``fillers`` layouts, the
evaluation queries). Here: :class:`RoutingWorld`, :class:`Arranged` (prompts and where their parts sit),
:func:`alphabet_ids`, :func:`distractor_offsets` and the world's constants.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from revlens.config import check_choice
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

    def training_data(self) -> tuple[Int[Tensor, "n pos"], Int[Tensor, "n pos"]]:
        """Sentences ``A B D1 D2`` with B at offset ``delta`` (``sentences_per_fact`` each) and their
        position ids: ``0, delta, o1, o2`` with gaps, ``0 .. 2 delta + 1`` with fillers."""
        facts, distractors, offsets = self._draw(self.sentences_per_fact, 0, self.delta)
        arranged = self._arrange(torch.tensor(self.a_ids)[facts], facts, distractors, offsets, self.delta, mirrored=False)
        return arranged.tokens, arranged.positions

    def training_sentences(self) -> Int[Tensor, "n pos"]:
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

    def decode(self, tokens: Int[Tensor, "... pos"], positions: Int[Tensor, "... pos"] | None = None) -> list[str]:
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

    tokens: Int[Tensor, "n pos"]
    positions: Int[Tensor, "n pos"]
    answer_slot: int
    b_index: Int[Tensor, " n"]
    d_index: Int[Tensor, "n n_distractors"]


def distractor_offsets(delta: int) -> list[int]:
    """The offsets a distractor may take for ``delta``: 1 .. 2 * delta + 1 without ``delta``."""
    return [o for o in range(1, 2 * delta + 2) if o != delta]
