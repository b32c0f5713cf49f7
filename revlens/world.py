"""The toy reversal world: single-token facts "A r B" and the named evaluation sets.

Vocabulary: ``[M]`` (mask, id 0), ``r`` (relation, id 1), then the A alphabet, then the disjoint
B alphabet. Each fact pairs A_i with B_{pi(i)} for a seeded random permutation pi. Facts are
split into

* forward-only facts, trained only as "A r B";
* control facts, trained both as "A r B" and "B r A".

Evaluation sets (``prompt -> answer``, the answer sits at the mask):

=================  ==================  ===========================================================
name               prompt -> answer    meaning
=================  ==================  ===========================================================
forward            A r [M] -> B        the trained direction
inplace            [M] r B -> A        what masked training sees: A *before* B
reverse            B r [M] -> A        never trained: A *after* B (the reversal curse query)
control_reverse    B r [M] -> A        control facts, whose reverse sentence *is* trained
=================  ==================  ===========================================================

Chance level is 1 / n_facts: a guess that at least knows which alphabet the answer comes from.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from revlens.atomic import write_json_atomic
from revlens.config import load_json

MASK, RELATION = "[M]", "r"
EVAL_SETS: tuple[str, ...] = ("forward", "inplace", "reverse", "control_reverse")


@dataclass(frozen=True)
class EvalSet:
    """Prompts with one mask each, the mask's position and the expected token there.

    ``candidates`` is the answer's alphabet (every A entity for an A answer, every B entity for a
    B answer): accuracy "within type" takes the argmax over these ids only. ``positions`` are the
    tokens' position ids where a world spaces them out (:mod:`revlens.routing`).
    """

    name: str
    prompts: Int[Tensor, "n pos"]
    mask_pos: int
    answers: Int[Tensor, " n"]
    candidates: Int[Tensor, " n_candidates"]
    positions: Int[Tensor, "n pos"] | None = None
    """Position ids of the prompt tokens (None: 0 .. seq - 1)."""


def _check_sizes(n_facts: Any, n_control: Any) -> None:
    """At least 2 facts (integers, not bools) and room for both the forward-only and the control split."""
    if type(n_facts) is not int or n_facts < 2:
        raise ValueError(f"a world needs at least 2 facts, got n_facts={n_facts!r}")
    if type(n_control) is not int or not 1 <= n_control <= n_facts - 1:
        raise ValueError(
            f"n_control={n_control!r} leaves no room for both splits: it must lie in "
            f"[1, n_facts - 1] = [1, {n_facts - 1}]"
        )


@dataclass(frozen=True)
class ReversalWorld:
    """A seeded set of facts (A_i, B_i) with a forward-only / control split."""

    n_facts: int
    n_control: int
    seed: int
    a_ids: tuple[int, ...]  # A entity of each fact
    b_ids: tuple[int, ...]  # B entity of each fact (same order)

    @classmethod
    def generate(cls, n_facts: int = 200, n_control: int = 40, seed: int = 0) -> "ReversalWorld":
        """Draw a world; the first ``n_facts - n_control`` facts are forward-only."""
        _check_sizes(n_facts, n_control)
        gen = torch.Generator().manual_seed(seed)
        first_a, first_b = 2, 2 + n_facts
        a_ids = tuple(first_a + i for i in torch.randperm(n_facts, generator=gen).tolist())
        b_ids = tuple(first_b + i for i in torch.randperm(n_facts, generator=gen).tolist())
        return cls(n_facts, n_control, seed, a_ids, b_ids)

    # ---- vocabulary -------------------------------------------------------------------------
    @property
    def vocab(self) -> list[str]:
        n = self.n_facts
        return [MASK, RELATION] + [f"A{i}" for i in range(n)] + [f"B{i}" for i in range(n)]

    @property
    def d_vocab(self) -> int:
        return 2 + 2 * self.n_facts

    @property
    def mask_id(self) -> int:
        return 0

    @property
    def relation_id(self) -> int:
        return 1

    @property
    def chance(self) -> float:
        return 1.0 / self.n_facts

    def decode(self, tokens: Int[Tensor, "... pos"]) -> list[str]:
        """Token ids to space-joined strings, one per row."""
        vocab = self.vocab
        rows = tokens.reshape(-1, tokens.shape[-1]).tolist()
        return [" ".join(vocab[t] for t in row) for row in rows]

    # ---- facts and sentences ----------------------------------------------------------------
    def _facts(self, split: str) -> tuple[Tensor, Tensor]:
        cut = self.n_facts - self.n_control
        sl = {"forward_only": slice(0, cut), "control": slice(cut, None), "all": slice(None)}[split]
        return torch.tensor(self.a_ids[sl]), torch.tensor(self.b_ids[sl])

    @staticmethod
    def _sentences(first: Tensor, second: Tensor, relation: int) -> Tensor:
        return torch.stack([first, torch.full_like(first, relation), second], dim=1)

    def training_sentences(self) -> Int[Tensor, "n_sentences 3"]:
        """"A r B" for every fact, plus "B r A" for the control facts only."""
        a, b = self._facts("all")
        ca, cb = self._facts("control")
        r = self.relation_id
        return torch.cat([self._sentences(a, b, r), self._sentences(cb, ca, r)])

    def eval_set(self, name: str) -> EvalSet:
        """One of :data:`EVAL_SETS` (see the module docstring)."""
        if name not in EVAL_SETS:
            raise ValueError(f"unknown evaluation set {name!r}; expected one of {', '.join(EVAL_SETS)}")
        split = "control" if name.startswith("control") else "forward_only"
        a, b = self._facts(split)
        r, m = self.relation_id, self.mask_id
        mask = torch.full_like(a, m)
        a_alphabet, b_alphabet = self.alphabet("A"), self.alphabet("B")
        if name == "forward":
            return EvalSet(name, self._sentences(a, mask, r), 2, b, b_alphabet)
        if name == "inplace":
            return EvalSet(name, self._sentences(mask, b, r), 0, a, a_alphabet)
        return EvalSet(name, self._sentences(b, mask, r), 2, a, a_alphabet)

    def alphabet(self, kind: str) -> Int[Tensor, " n_facts"]:
        """Token ids of every A entity (``kind="A"``) or every B entity (``"B"``)."""
        first = {"A": 2, "B": 2 + self.n_facts}.get(kind)
        if first is None:
            raise ValueError(f"unknown alphabet {kind!r}; expected 'A' or 'B'")
        return torch.arange(first, first + self.n_facts)

    # ---- persistence --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        vocab = self.vocab
        return {
            "n_facts": self.n_facts,
            "n_control": self.n_control,
            "seed": self.seed,
            "vocab": vocab,
            "facts": [[vocab[a], vocab[b]] for a, b in zip(self.a_ids, self.b_ids)],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ReversalWorld":
        """The world a :meth:`to_dict` object describes; a missing or wrong-typed field, an entity outside
        its alphabet (a B where an A belongs, say) or an entity in two facts is an error naming it."""
        if not isinstance(data, dict):
            raise ValueError(f"a world must be a JSON object, got {type(data).__name__}")
        missing = [k for k in ("n_facts", "n_control", "seed", "facts") if k not in data]
        if missing:
            raise ValueError(f"world lacks the field(s) {', '.join(repr(k) for k in missing)}")
        _check_sizes(data["n_facts"], data["n_control"])
        if type(data["seed"]) is not int:
            raise ValueError(f"world field 'seed' must be an integer, got {data['seed']!r}")
        world = cls(data["n_facts"], data["n_control"], data["seed"], (), ())
        if data.get("vocab", world.vocab) != world.vocab:
            raise ValueError("world file's vocabulary does not match its n_facts")
        facts = data["facts"]
        if not isinstance(facts, list) or not all(
            isinstance(f, list) and len(f) == 2 and all(isinstance(t, str) for t in f) for f in facts
        ):
            raise ValueError("world field 'facts' must be a list of [A, B] pairs of entity names")
        if len(facts) != world.n_facts:
            raise ValueError(f"world file lists {len(facts)} facts but says n_facts={world.n_facts}")
        index = {tok: i for i, tok in enumerate(world.vocab)}
        ids = []
        for side, alphabet in ((0, world.alphabet("A")), (1, world.alphabet("B"))):
            kind = "AB"[side]
            first, last = int(alphabet[0]), int(alphabet[-1])
            for i, fact in enumerate(facts):
                if fact[side] not in index:
                    raise ValueError(f"world fact {i} {fact} names an entity outside its vocabulary: {fact[side]!r}")
                if not first <= index[fact[side]] <= last:
                    raise ValueError(f"world fact {i} {fact}: {fact[side]!r} is not an {kind} entity "
                                     f"(facts are [A, B] pairs, A0..A{world.n_facts - 1} then B0..B{world.n_facts - 1})")
            side_ids = tuple(index[f[side]] for f in facts)
            if len(set(side_ids)) != len(side_ids):
                repeated = sorted(name for name, n in Counter(f[side] for f in facts).items() if n > 1)
                raise ValueError(f"world facts repeat the {kind} entit{'y' if len(repeated) == 1 else 'ies'} "
                                 f"{', '.join(repeated)}: each entity belongs to exactly one fact")
            ids.append(side_ids)
        return cls(world.n_facts, world.n_control, world.seed, ids[0], ids[1])

    def save(self, path: str | Path) -> None:
        """Write the world as JSON atomically (a crash leaves the old file or the new one)."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "ReversalWorld":
        """Read a world file; any problem with its content is a ValueError naming the file."""
        try:
            return cls.from_dict(load_json(path))
        except ValueError as err:
            if str(err).startswith(str(path)):  # load_json already names it
                raise
            raise ValueError(f"{path}: {err}") from None
