"""Relational facts with both directions, prompts for masked and left-to-right models, and a scorer.

A :class:`Relation` holds two sentence templates: ``forward`` names A before B and ends with B
("{a} wrote {b} ."), ``reverse`` names B before A and ends with A ("{b} was written by {a} .").
Queries put the answer in the template's *last* slot, so the same query serves an MDM (mask the
slot, keep the text after it) and an ARM (complete the text before it):

=========  ===================  ===========================================================
direction  template, slot       meaning
=========  ===================  ===========================================================
forward    forward, B           the direction the fact is usually stated in
reverse    reverse, A           the reversal-curse query: A must be recalled *after* B
inplace    forward, A           masked models only: A recalled *before* B ("[M] wrote B")
=========  ===================  ===========================================================

Scoring rule (stated with every number): the model writes exactly as many tokens as the gold
answer has (an MDM gets that many masks; an ARM decodes that many tokens greedily); the answer is
correct when the decoded text, stripped and lower-cased, *starts with* the gold answer stripped
and lower-cased (``startswith``); ``exact`` (same token ids) and ``substring`` are available.
Log-probabilities are exact chain-rule values: teacher-forced left to right for ARMs, and for MDMs
the probability of unmasking the gold tokens one at a time, left to right.
"""

from __future__ import annotations

import string
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from revlens.atomic import write_json_atomic
from revlens.config import check_choice, load_json

Direction = Literal["forward", "reverse", "inplace"]
DIRECTIONS: tuple[str, ...] = ("forward", "reverse", "inplace")
Rule = Literal["startswith", "exact", "substring"]
RULES: tuple[str, ...] = ("startswith", "exact", "substring")
Decode = Literal["sequential", "parallel"]
DECODES: tuple[str, ...] = ("sequential", "parallel")
"""How a masked model fills the answer slot. ``sequential``: one token per forward pass, the most confident open
mask first (LLaDA's low-confidence remasking, one token per step), gold log-probability unmasked left to right.
``parallel``: every answer token in one forward pass with all of them masked, gold log-probability the sum of
the per-position log-probabilities of that pass (a product of per-slot marginals, not the model's joint
probability of the answer; compare log-probabilities within one decoding only). A model trained with
whole-entity masking only ever sees an entity fully masked or fully visible, so ``parallel`` asks it the question
it was trained on; ``sequential`` asks for the rest of an entity with one of its tokens filled in, a context its
training never produced. Causal models always continue left to right (``sequential``): see :func:`model_decodes`."""
SPLITS: tuple[str, ...] = ("forward_only", "control", "real")
"""``forward_only``/``control``: synthetic facts trained in one/both directions; ``real``: not trained here."""
_PUNCTUATION = " .,;:!?"


@dataclass(frozen=True)
class Relation:
    name: str
    forward: str  # "{a} ... {b} ..." : A before B
    reverse: str  # "{b} ... {a} ..." : B before A

    def __post_init__(self) -> None:
        _check_text("relation name", self.name)
        for field, first, second in (("forward", "{a}", "{b}"), ("reverse", "{b}", "{a}")):
            text = getattr(self, field)
            _check_text(f"relation {self.name!r}: {field} template", text)
            try:  # every field of the format string, with any conversion or format spec kept in its text
                slots = [f"{{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}"
                         for _, name, spec, conv in string.Formatter().parse(text) if name is not None]
            except ValueError as err:  # an unmatched brace
                raise ValueError(f"relation {self.name!r}: the {field} template {text!r} is not a template: {err}") from None
            if slots != [first, second]:
                raise ValueError(f"relation {self.name!r}: the {field} template needs exactly the placeholders "
                                 f"{first} then {second}, once each, got {text!r}")


@dataclass(frozen=True)
class Fact:
    relation: str
    a: str
    b: str
    split: str = "forward_only"  # or "control": its reverse sentence is also trained (synthetic sets); see SPLITS

    def __post_init__(self) -> None:
        for field in ("relation", "a", "b"):
            _check_text(f"fact {field}", getattr(self, field))
        check_choice("split", self.split, SPLITS)


def _check_text(what: str, value: Any) -> None:
    """Names, answers and templates must be non-blank strings: an empty answer would score as correct."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")


def _entry(path: str | Path, where: str, kind: type, entry: Any) -> Any:
    """``kind(**entry)``, with the file and entry named in any error."""
    names = [f.name for f in fields(kind)]
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: {where} must be an object with keys {names}, got {entry!r}")
    unknown = sorted(set(entry) - set(names))
    if unknown:
        raise ValueError(f"{path}: {where} has unknown keys {unknown}; expected {names}")
    try:
        return kind(**entry)
    except TypeError as err:  # a missing key
        raise ValueError(f"{path}: {where}: {err}") from None
    except ValueError as err:
        raise ValueError(f"{path}: {where}: {err}") from None


@dataclass(frozen=True)
class Query:
    """Text before the answer slot, the gold answer, text after it."""

    fact: int
    direction: str
    prefix: str
    answer: str
    suffix: str


@dataclass
class FactSet:
    relations: dict[str, Relation]
    facts: list[Fact]
    description: str = ""

    def __post_init__(self) -> None:
        if not self.facts:
            raise ValueError("a fact set needs at least one fact")
        misnamed = [f"{key!r} holds {r.name!r}" for key, r in self.relations.items() if key != r.name]
        if misnamed:
            raise ValueError(f"relations must be keyed by their name: {', '.join(misnamed)}")
        unknown = sorted({f.relation for f in self.facts} - set(self.relations))
        if unknown:
            raise ValueError(f"facts use undefined relation(s): {', '.join(unknown)}")
        check_distinct(self.facts)

    @classmethod
    def load(cls, path: str | Path) -> "FactSet":
        """Read a fact file; any problem is a ValueError naming the file and the entry (``facts[3]``)."""
        data = load_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("relations"), list) or not isinstance(data.get("facts"), list):
            raise ValueError(f"{path}: a fact file holds an object with lists 'relations' and 'facts'")
        unknown = sorted(set(data) - {"description", "relations", "facts"})
        if unknown:
            raise ValueError(f"{path}: unknown top-level keys {unknown}")
        relations: dict[str, Relation] = {}
        for i, entry in enumerate(data["relations"]):
            relation = _entry(path, f"relations[{i}]", Relation, entry)
            if relation.name in relations:
                raise ValueError(f"{path}: relations[{i}]: duplicate relation name {relation.name!r}")
            relations[relation.name] = relation
        facts = [_entry(path, f"facts[{i}]", Fact, entry) for i, entry in enumerate(data["facts"])]
        try:
            return cls(relations, facts, str(data.get("description", "")))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def save(self, path: str | Path) -> None:
        """Write the fact file atomically (a kill leaves the old file or the new one)."""
        data = {"description": self.description, "relations": [asdict(r) for r in self.relations.values()],
                "facts": [asdict(f) for f in self.facts]}
        write_json_atomic(path, data)

    def subset(self, split: str | None = None, relation: str | None = None) -> list[int]:
        return [i for i, f in enumerate(self.facts)
                if (split is None or f.split == split) and (relation is None or f.relation == relation)]

    def sentence(self, i: int, template: str) -> str:
        fact = self.facts[i]
        return getattr(self.relations[fact.relation], template).format(a=fact.a, b=fact.b)

    def query(self, i: int, direction: Direction) -> Query:
        check_choice("direction", direction, DIRECTIONS)
        fact, relation = self.facts[i], self.relations[self.facts[i].relation]
        template, slot, other = {
            "forward": (relation.forward, "{b}", "{a}"),
            "reverse": (relation.reverse, "{a}", "{b}"),
            "inplace": (relation.forward, "{a}", "{b}"),
        }[direction]
        values = {"{a}": fact.a, "{b}": fact.b}
        # the template filled with the other entity and a marker at the slot: escaped braces ("{{b}}") are text
        filled = template.format(**{slot[1]: _SLOT, other[1]: values[other]})
        before, after = filled.split(_SLOT)
        return Query(i, direction, before.rstrip(), values[slot], after)


_SLOT = "\x00slot\x00"  # marks the answer slot while a template is filled (no name contains a NUL)


def check_distinct(facts: list[Fact]) -> None:
    """Refuse a fact listed twice, or two answers to one forward query (same relation and A, another B): either
    would reweight every mean over facts without a trace. Several A of one B (an author's books) are allowed."""
    seen: dict[tuple[str, str], tuple[int, str]] = {}
    for i, fact in enumerate(facts):
        key = (fact.relation, fact.a)
        if key in seen:
            j, b = seen[key]
            what = "duplicate fact" if b == fact.b else f"conflicting facts (B {b!r} and {fact.b!r})"
            raise ValueError(f"facts[{j}] and facts[{i}]: {what} for relation {fact.relation!r} and A {fact.a!r}; "
                             "keep one")
        seen[key] = (i, fact.b)


def is_correct(predicted: str, gold: str, rule: Rule = "startswith") -> bool:
    """A string rule on stripped, lower-cased text (``exact`` compares token ids, in :func:`answer_scores`)."""
    check_choice("rule", rule, ("startswith", "substring"))
    p, g = predicted.strip().lower(), gold.strip().lower()
    return p.startswith(g) if rule == "startswith" else g in p


@dataclass(frozen=True)
class EncodedQuery:
    prompt: list[int]  # masked model: prefix + masks + suffix; ARM: prefix only
    answer: list[int]
    answer_start: int


def encode_query(lm, query: Query) -> EncodedQuery:
    """Token ids of a query; a mask token in its text (a name containing the mask text) is refused, since it would
    add an answer slot the scorer does not fill."""
    prefix = lm.encode(query.prefix, special_tokens=True)
    answer = lm.encode(" " + query.answer)
    mask = getattr(lm, "mask_token_id", None)
    if mask is not None and mask in prefix + answer + (lm.encode(query.suffix) if query.suffix.strip() else []):
        raise ValueError(f"query {query.direction!r} of fact {query.fact} contains the mask token's text "
                         f"({lm.decode([mask])!r}): {query.prefix!r} + {query.answer!r} + {query.suffix!r}")
    if not lm.family.masked:
        if query.suffix.strip(_PUNCTUATION):  # a completion may ignore trailing punctuation, not content
            raise ValueError(f"{lm.family.name} is left-to-right: it cannot answer a slot with text after it "
                             f"({query.direction!r} query); use forward or reverse")
        return EncodedQuery(prefix, answer, len(prefix))
    suffix = lm.encode(query.suffix) if query.suffix.strip() else []
    return EncodedQuery(prefix + [int(lm.mask_token_id)] * len(answer) + suffix, answer, len(prefix))


def unencodable(lm, queries: list[Query]) -> list[str]:
    """One line per query whose text the tokenizer cannot write: a word it maps to a special token (its unknown
    token, or ``<pad>`` for a word-level vocabulary without one) or the text of a special token. Such a query scores
    a placeholder instead of the words, so a gold answer made of unknown words could even be counted correct."""
    specials = set(getattr(lm.tokenizer, "all_special_ids", ())) | {getattr(lm.tokenizer, "unk_token_id", None)} - {None}
    out = []
    for q in queries:
        for field in ("prefix", "answer", "suffix"):
            text = getattr(q, field)
            if set(lm.encode(" " + text)) & specials:
                words = [w for w in text.split() if set(lm.encode(" " + w)) & specials] or [text]
                out.append(f"fact {q.fact} ({q.direction}): {field} {text!r} has {', '.join(map(repr, words))}")
    return out


def check_encodable(lm, queries: list[Query]) -> None:
    """Raise a ValueError naming the queries (fact, direction, words) that :func:`unencodable` finds."""
    bad = unencodable(lm, queries)
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise ValueError(f"{len(bad)} query text(s) cannot be written by the tokenizer of {lm.source} (unknown "
                         f"words or special-token text): " + "; ".join(bad[:5]) + more
                         + "; use a fact set in the model's vocabulary")


def _finite(lm, logits: Tensor) -> Tensor:
    """``logits`` unless one is NaN or infinite, which would make every score and rank meaningless."""
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(f"{lm.source}: the model produced non-finite logits (NaN or inf); its weights or config.json "
                         "are broken")
    return logits


def _slot_logprobs(lm, prompts: Tensor, slots: int | slice = slice(None)) -> Float[Tensor, "batch *slots vocab"]:
    """Log-probabilities at the open masks ``slots`` (default: all) of one forward pass (float32, on CPU); only
    those are normalised, so a caller that needs one mask does not pay the softmax of the others."""
    return _finite(lm, lm.mask_logits(prompts)[:, slots]).float().log_softmax(-1).cpu()


def _gold_in_pass(logp: Float[Tensor, "batch slots vocab"], answers: Int[Tensor, "batch slots"]) -> Float[Tensor, "batch"]:
    """Sum over the answer slots of one pass's log-probability of the gold token (the parallel joint)."""
    return logp.gather(-1, answers[..., None]).squeeze(-1).sum(-1)


@torch.no_grad()
def _masked_gold_logp(lm, prompts: Tensor, answers: Tensor, start: int, decode: Decode = "sequential") -> Tensor:
    """Log-probability of the gold answer, one group (on CPU): unmasked left to right (``sequential``), or read
    from the one pass with every answer token masked (``parallel``)."""
    if decode == "parallel":
        return _gold_in_pass(_slot_logprobs(lm, prompts), answers)
    rows = torch.arange(prompts.shape[0])
    gold_logp = torch.zeros(prompts.shape[0])
    teacher = prompts.clone()
    for j in range(answers.shape[1]):
        logp = _slot_logprobs(lm, teacher, 0)  # the leftmost open mask
        gold_logp += logp[rows, answers[:, j]]
        teacher[:, start + j] = answers[:, j]
    return gold_logp


@torch.no_grad()
def _causal_gold_logp(lm, prompts: Tensor, answers: Tensor) -> Tensor:
    """Teacher-forced log-probability of the gold answer after the prompt, one group (on CPU)."""
    n, p = answers.shape[1], prompts.shape[1]
    logits = _finite(lm, lm(torch.cat([prompts, answers], dim=1))[:, p - 1 : p - 1 + n]).float().log_softmax(-1).cpu()
    return logits.gather(-1, answers[..., None]).squeeze(-1).sum(-1)


@torch.no_grad()
def _without_mask(scores: Float[Tensor, "*batch vocab"], mask_id: int) -> Float[Tensor, "*batch vocab"]:
    """``scores`` with the mask token made impossible: a decoder that wrote the mask token would leave the slot
    open (and a later step would count an unfilled slot), so it chooses among the other tokens, as
    :mod:`revlens.lm.generation` does. Gold log-probabilities are read from the unaltered distribution."""
    scores = scores.clone()
    scores[..., mask_id] = float("-inf")
    return scores


def _score_masked(lm, prompts: Tensor, answers: Tensor, start: int, decode: Decode,
                  with_logp: bool = True) -> tuple[Tensor, Tensor]:
    """Filled answer slots and gold log-probability under ``decode`` (see :data:`DECODES`), one group (on CPU);
    without ``with_logp`` the log-probabilities are NaN and their passes are not run."""
    n = answers.shape[1]
    slots = torch.arange(start, start + n)
    rows = torch.arange(prompts.shape[0])
    mask_id = int(lm.mask_token_id)
    if decode == "parallel":  # one pass: its argmax per slot, and the gold tokens' log-probabilities
        logp = _slot_logprobs(lm, prompts)
        return _without_mask(logp, mask_id).argmax(-1), _gold_in_pass(logp, answers)
    gold_logp = (_masked_gold_logp(lm, prompts, answers, start, decode) if with_logp
                 else torch.full((prompts.shape[0],), float("nan")))
    filled = prompts.clone()
    for _ in range(n):  # greedy low-confidence remasking: commit the most confident mask each step
        masks = (filled == mask_id)[:, slots]
        logits = _without_mask(_finite(lm, lm.mask_logits(filled)).float(), mask_id)
        conf, tok = (t.cpu() for t in logits.softmax(-1).max(-1))  # [batch, open]
        pos = masks.nonzero()[:, 1].reshape(prompts.shape[0], -1)
        best = conf.argmax(-1)
        filled[rows, slots[pos[rows, best]]] = tok[rows, best]
    return filled[:, slots], gold_logp


@torch.no_grad()
def _score_causal(lm, prompts: Tensor, answers: Tensor, with_logp: bool = True) -> tuple[Tensor, Tensor]:
    """Greedy continuation and teacher-forced gold log-probability (NaN without ``with_logp``), one group (on CPU)."""
    n, p = answers.shape[1], prompts.shape[1]
    gold_logp = (_causal_gold_logp(lm, prompts, answers) if with_logp
                 else torch.full((prompts.shape[0],), float("nan")))
    tokens = prompts
    for _ in range(n):
        tokens = torch.cat([tokens, _finite(lm, lm(tokens)[:, -1]).argmax(-1, keepdim=True).cpu()], dim=1)
    return tokens[:, p:], gold_logp


def _shape_groups(encoded: list[EncodedQuery]) -> dict[tuple[int, int, int], list[int]]:
    """Query indices grouped by (prompt length, answer length, answer start): each group is one batch."""
    groups: dict[tuple[int, int, int], list[int]] = defaultdict(list)
    for i, e in enumerate(encoded):
        groups[(len(e.prompt), len(e.answer), e.answer_start)].append(i)
    return groups


def answer_logprobs(lm, queries: list[Query], decode: Decode = "sequential") -> Tensor:
    """The exact gold log-probability of every query (as in :func:`answer_scores`, without decoding)."""
    check_decode(lm, decode)
    encoded = [encode_query(lm, q) for q in queries]
    out = torch.zeros(len(queries))
    for (_, _, start), members in _shape_groups(encoded).items():
        prompts = torch.tensor([encoded[i].prompt for i in members])
        answers = torch.tensor([encoded[i].answer for i in members])
        if lm.family.masked:
            out[members] = _masked_gold_logp(lm, prompts, answers, start, decode)
        else:
            out[members] = _causal_gold_logp(lm, prompts, answers)
    return out


def model_decodes(lm) -> tuple[str, ...]:
    """The decodings ``lm`` can be scored with: both for a masked model, left to right for a causal one."""
    return DECODES if lm.family.masked else ("sequential",)


def check_decode(lm, decode: str) -> None:
    """Raise unless ``decode`` is one of :data:`DECODES` and ``lm`` can decode that way."""
    check_choice("decode", decode, DECODES)
    if decode == "parallel" and not lm.family.masked:
        raise ValueError(f"{lm.family.name} is left-to-right: it cannot fill an answer in one parallel step; "
                         "use decode='sequential'")


def answer_scores(lm, queries: list[Query], rule: Rule = "startswith", decode: Decode = "sequential",
                  with_logp: bool = True) -> list[dict]:
    """One row per query: fact, direction, gold, predicted text, correct (under ``rule``), gold log-prob.

    Queries are batched by prompt shape; masked models get as many masks as the gold answer has tokens and fill
    them as ``decode`` says (see :data:`DECODES`). ``with_logp=False`` skips the gold log-probability (NaN), whose
    teacher-forced passes cost as much as the decoding, for a caller that needs only the answers.
    """
    check_choice("rule", rule, RULES)
    check_decode(lm, decode)
    encoded = [encode_query(lm, q) for q in queries]
    rows: list[dict] = [{} for _ in queries]
    for (_, _, start), members in _shape_groups(encoded).items():
        prompts = torch.tensor([encoded[i].prompt for i in members])
        answers = torch.tensor([encoded[i].answer for i in members])
        if lm.family.masked:
            predicted, logp = _score_masked(lm, prompts, answers, start, decode, with_logp)
        else:
            predicted, logp = _score_causal(lm, prompts, answers, with_logp)
        for k, i in enumerate(members):
            text = lm.decode(predicted[k].tolist())
            same_ids = predicted[k].tolist() == encoded[i].answer
            correct = same_ids if rule == "exact" else is_correct(text, queries[i].answer, rule)
            rows[i] = {"fact": queries[i].fact, "direction": queries[i].direction, "gold": queries[i].answer,
                       "predicted": text.strip(), "correct": bool(correct), "logp": float(logp[k]),
                       "n_tokens": len(encoded[i].answer)}
    return rows
