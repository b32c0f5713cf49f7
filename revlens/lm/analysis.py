"""Model-agnostic reversal analyses on fact sets: routes, patching pairs and forward/reverse accuracy.

Routes, as in the toy (:mod:`revlens.routes`): a masked model reads the mask -> B route in the
trained-order prompt "[M] ... B" (the ``inplace`` query) and in the reverse prompt "B ... [M]";
the query is the position that predicts the first answer token (the mask itself for LLaDA, one
before it for Dream) and the key is B's last token. A left-to-right model has no prompt where it
sees B while predicting A, so its counterpart, as in the toy, is the readout position attending to
the subject: A in the forward completion prompt, B in the reverse one.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from revlens.facts import Decode, FactSet, answer_logprobs, answer_scores, check_encodable, encode_query
from revlens.patching import patch_head_out, patch_names, patch_resid_pre
from revlens.routes import RouteCorrelation, correlate_routes, read_routes_ragged


def _last_token_of(lm, ids: list[int], entity: str) -> int:
    """Position of ``entity``'s last token inside the prompt ``ids`` (searched with and without a leading space)."""
    for candidate in (" " + entity, entity):
        sub = lm.encode(candidate)
        for start in range(len(ids) - len(sub), -1, -1):
            if ids[start : start + len(sub)] == sub:
                return start + len(sub) - 1
    raise ValueError(f"could not find {entity!r} as a token span of the prompt {lm.decode(ids)!r}")


def fact_route_correlation(lm, facts: FactSet, indices: list[int]) -> RouteCorrelation:
    """Per-(layer, head) correlation across facts of the forward-order and reverse-order routes."""
    directions = ("inplace", "reverse") if lm.family.masked else ("forward", "reverse")
    readings = []
    for direction in directions:
        prompts, queries, keys = [], [], []
        for i in indices:
            fact, enc = facts.facts[i], encode_query(lm, facts.query(i, direction))
            # the query predicts the first answer token (an ARM's: the last prompt token); the key is B
            # for a masked model, the subject (A forward, B reverse) for a left-to-right one
            key = fact.a if direction == "forward" else fact.b
            prompts.append(enc.prompt)
            queries.append(int(lm.read_position(enc.answer_start)))
            keys.append(_last_token_of(lm, enc.prompt, key))
        readings.append(read_routes_ragged(lm, prompts, queries, keys))
    return correlate_routes(*readings)


@dataclass(frozen=True)
class PatchingPairs:
    """Clean and corrupted prompts of one shape: the corrupted prompt asks about another fact's B."""

    clean: Int[Tensor, "n pos"]
    corrupted: Int[Tensor, "n pos"]
    answer: Int[Tensor, " n"]  # first token of the clean answer
    read_pos: int  # where that token is predicted
    facts: list[int]


def patching_pairs(lm, facts: FactSet, indices: list[int], direction: str = "reverse") -> PatchingPairs:
    """The largest group of same-shape queries, each paired with the next fact's prompt (a cyclic shift)."""
    groups: dict[tuple, list[tuple[int, list[int], list[int], int]]] = defaultdict(list)
    for i in indices:
        enc = encode_query(lm, facts.query(i, direction))
        shape = (facts.facts[i].relation, len(enc.prompt), len(enc.answer), enc.answer_start)
        groups[shape].append((i, enc.prompt, enc.answer, enc.answer_start))
    members = max(groups.values(), key=len)
    if len(members) < 2:
        raise ValueError("need at least two queries of the same shape to build clean/corrupted pairs")
    clean = torch.tensor([m[1] for m in members])
    corrupted = torch.roll(clean, 1, dims=0)
    answer = torch.tensor([m[2][0] for m in members])
    return PatchingPairs(clean, corrupted, answer, int(lm.read_position(members[0][3])), [m[0] for m in members])


def answer_logprob_metric(pairs: PatchingPairs):
    """Mean log-probability of each clean answer's first token, at its readout position."""

    def metric(logits: Tensor) -> Tensor:
        logp = logits[:, pairs.read_pos].float().log_softmax(-1)
        return logp.gather(-1, pairs.answer.to(logp.device)[:, None]).mean()

    return metric


def score_table(lm, facts: FactSet, directions: tuple[str, ...] | None = None,
                rule: str = "startswith", decode: Decode = "sequential") -> pd.DataFrame:
    """Every fact scored in every direction the model can answer, as a tidy DataFrame (+ split, relation);
    ``decode``: how a masked model fills the answer (:data:`revlens.facts.DECODES`). A fact the model's tokenizer
    cannot write (:func:`revlens.facts.unencodable`) is refused before any scoring."""
    if directions is None:
        directions = ("forward", "reverse", "inplace") if lm.family.masked else ("forward", "reverse")
    queries = {d: [facts.query(i, d) for i in range(len(facts.facts))] for d in directions}
    check_encodable(lm, [q for qs in queries.values() for q in qs])
    rows = []
    for direction in directions:
        rows += answer_scores(lm, queries[direction], rule=rule, decode=decode)
    table = pd.DataFrame(rows)
    table["split"] = [facts.facts[i].split for i in table.fact]
    table["relation"] = [facts.facts[i].relation for i in table.fact]
    return table


def foil_logp(lm, facts: FactSet, indices: list[int], direction: str = "reverse",
              decode: Decode = "sequential") -> pd.DataFrame:
    """A baseline for the gold log-probability: the log-probability the same model gives *another* fact's
    answer (the next fact in ``indices`` of the same relation with a different answer, e.g. another person) in
    the same prompt.

    A model that stores nothing about the queried fact gives gold and foil the same distribution, so gold
    beats foil for about half the facts. The foil comes from the same relation so that it is an answer of the
    same kind (a person for a person, not a capital). One row per fact: ``fact``, ``foil`` (text), ``foil logp``
    (scored as ``decode`` says, like the gold log-probability it is compared with). A masked model gets as many
    masks as the foil has tokens, so a foil of another length is asked in a prompt of another length: the
    synthetic worlds here give every person two tokens, real fact sets may not.
    """
    queries = [facts.query(i, direction) for i in indices]
    relations = [facts.facts[i].relation for i in indices]
    foils = []
    for k, q in enumerate(queries):
        others = ((k + step) % len(queries) for step in range(1, len(queries)))
        foil = next((queries[j].answer for j in others if relations[j] == relations[k] and queries[j].answer != q.answer), None)
        if foil is None:
            raise ValueError(f"foil_logp: fact {indices[k]} has no other fact of relation {relations[k]!r} "
                             f"with a different answer among the {len(indices)} given")
        foils.append(replace(q, answer=foil))
    return pd.DataFrame({"fact": indices, "foil": [q.answer for q in foils],
                         "foil logp": answer_logprobs(lm, foils, decode).numpy()})


@dataclass(frozen=True)
class PatchingResult:
    """Patching maps normalised so 0 = the corrupted run's metric and 1 = the clean run's."""

    clean: float
    corrupted: float
    resid_pre: Tensor  # [layer, pos]
    head_out: Tensor  # [layer, head]
    tokens: list[str]  # the clean prompt of the first pair, for axis labels


def reverse_patching(lm, pairs: PatchingPairs, **kwargs) -> PatchingResult:
    """Residual-stream (layer, position) and head-output (layer, head) patching of ``pairs``, normalised."""
    metric = answer_logprob_metric(pairs)
    names = patch_names(lm, "resid_pre") + patch_names(lm, "head_out")
    clean_logits, cache = lm.run_with_cache(pairs.clean, names)
    clean, corrupted = metric(clean_logits).item(), metric(lm(pairs.corrupted)).item()

    def normalise(t: Tensor) -> Tensor:
        return (t - corrupted) / (clean - corrupted)

    resid = normalise(patch_resid_pre(lm, pairs.corrupted, cache, metric, **kwargs))
    heads = normalise(patch_head_out(lm, pairs.corrupted, cache, metric, **kwargs))
    labels = [lm.decode([t]).strip() for t in pairs.clean[0].tolist()]
    return PatchingResult(clean, corrupted, resid, heads, labels)


HEAD_COLUMNS = ("route corr fwd/rev (trained)", "route weight, reverse prompt", "patching recovery, control",
                "patching recovery, forward-only")


def head_table(route: RouteCorrelation, control: PatchingResult, forward_only: PatchingResult) -> pd.DataFrame:
    """One row per (layer, head) of a masked model: its mask -> B route's forward/reverse score correlation and
    mean weight in the reverse prompt (from :func:`fact_route_correlation`), and the head-output patching
    recovery on control and forward-only reverse prompts (from :func:`reverse_patching`)."""
    n_layers, n_heads = route.score_corr.shape
    columns = (route.score_corr, route.reverse.weights.mean(0), control.head_out, forward_only.head_out)
    return pd.DataFrame({name: values.flatten().numpy() for name, values in zip(HEAD_COLUMNS, columns)},
                        index=pd.MultiIndex.from_product([range(n_layers), range(n_heads)], names=["layer", "head"]))


def mdm_head_table(lm, facts: FactSet) -> pd.DataFrame:
    """:func:`head_table` of a masked model on the forward-only and control facts of ``facts``."""
    forward_only, control = facts.subset(split="forward_only"), facts.subset(split="control")
    patched = [reverse_patching(lm, patching_pairs(lm, facts, indices)) for indices in (control, forward_only)]
    return head_table(fact_route_correlation(lm, facts, forward_only), *patched)
