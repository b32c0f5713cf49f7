"""Fact queries answered by denoising steps: unmasking order, routes per step, and patching at a step.

The order of two queries of a fact is compared with random pairings fact by fact and person by person
(:func:`order_agreement`) and with the orders of namesakes (:func:`namesake_agreement`); patching at a step
is kept per answer slot, so that each step can be scored on the token it commits (:meth:`StepPatching.recovery`).

Built on :mod:`revlens.lm.generation`. Each query's answer slots are generated in as many steps as
the answer has tokens (one token per step, low-confidence remasking, greedy: the rule revlens'
fact scorer uses), prompts of one shape in one batch.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from revlens.facts import EncodedQuery, FactSet, encode_query
from revlens.lm.analysis import PatchingPairs, _last_token_of
from revlens.lm.generation import GenerationTrace, generate, patch_generation
from revlens.patching import HEAD_Z, RESID_PRE, head_out_sites, resid_pre_sites
from revlens.routes import PATTERN_HOOK, route_at
from revlens.stats import wilson_interval


@dataclass(frozen=True)
class QueryTraces:
    """One batch of same-shape queries and its generation (``cache`` per step when asked for)."""

    facts: list[int]
    encoded: list[EncodedQuery]
    trace: GenerationTrace


def generate_queries(lm, facts: FactSet, indices: list[int], direction: str, **kwargs) -> list[QueryTraces]:
    """Generate every query's answer, one token per step, batched by prompt shape."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    encoded = {i: encode_query(lm, facts.query(i, direction)) for i in indices}
    for i in indices:
        e = encoded[i]
        groups[(len(e.prompt), e.answer_start, len(e.answer))].append(i)
    out = []
    for (_, _, n_tokens), members in groups.items():
        prompts = torch.tensor([encoded[i].prompt for i in members])
        answers = torch.tensor([encoded[i].answer for i in members])
        trace = generate(lm, prompts, n_tokens, targets=answers, **kwargs)
        out.append(QueryTraces(members, [encoded[i] for i in members], trace))
    return out


def commit_order_table(lm, facts: FactSet, indices: list[int], directions: tuple[str, ...]) -> pd.DataFrame:
    """One row per query and answer token: when it was committed, its confidence, whether it is the gold token
    (``gold``: the gold token's id; ``person``: the fact's A, the unit its facts cluster in)."""
    rows = []
    for direction in directions:
        for group in generate_queries(lm, facts, indices, direction):
            trace = group.trace
            commit, answer = trace.commit_step.cpu(), trace.answer.cpu()
            prob = torch.zeros(commit.shape)
            for r in trace.records:
                prob.scatter_(1, r.slots.cpu(), r.probability.cpu())
            for k, i in enumerate(group.facts):
                gold = group.encoded[k].answer
                for slot in range(len(gold)):
                    rows.append({"fact": i, "direction": direction, "split": facts.facts[i].split,
                                 "relation": facts.facts[i].relation, "person": facts.facts[i].a, "slot": slot,
                                 "gold": gold[slot], "step": int(commit[k, slot]),
                                 "probability": float(prob[k, slot]), "correct": int(answer[k, slot]) == gold[slot],
                                 "answer_correct": answer[k].tolist() == gold})
    return pd.DataFrame(rows)


def entity_span(lm, prompt: list[int], entity: str) -> list[int]:
    """Positions of ``entity``'s tokens in ``prompt``."""
    last = _last_token_of(lm, prompt, entity)
    return list(range(last - len(lm.encode(" " + entity)) + 1, last + 1))


@dataclass(frozen=True)
class StepRoutes:
    """Mask -> B attention weight of every answer slot at every step, and when each slot was committed."""

    weights: Float[Tensor, "fact step slot layer head"]  # from the slot's readout position to B's last token
    commit_step: Int[Tensor, "fact slot"]


def route_weights_by_step(lm, facts: FactSet, indices: list[int], direction: str) -> StepRoutes:
    """Read every slot's route to B at every step (``blocks.{l}.attn.hook_pattern`` cached at every step),
    facts in the order of ``indices``."""
    names = [PATTERN_HOOK.format(layer=l) for l in range(lm.cfg.n_layers)]
    weights: dict[int, Tensor] = {}
    commits: dict[int, Tensor] = {}
    for group in generate_queries(lm, facts, indices, direction, cache_names=names):
        trace = group.trace
        keys = torch.tensor([_last_token_of(lm, e.prompt, facts.facts[i].b) for i, e in zip(group.facts, group.encoded)])
        queries = lm.read_position(trace.slots).cpu()  # [fact, slot]
        per_step = [torch.stack([route_at(trace.cache[s][name], queries, keys[:, None]).cpu() for name in names], 2)
                    for s in range(trace.n_steps)]  # each [fact, slot, layer, head]
        stacked = torch.stack(per_step, 1)
        for k, i in enumerate(group.facts):
            weights[i], commits[i] = stacked[k], trace.commit_step[k].cpu()
    return StepRoutes(torch.stack([weights[i] for i in indices]), torch.stack([commits[i] for i in indices]))


SlotChoice = str | int  # "open", "now", "later", or an answer slot's index: see StepPatching.recovery


@dataclass(frozen=True)
class SlotCounts:
    """Answer slots scored for one patched site: how many end with the clean run's token when patched (``hits``)
    and in the unpatched corrupted run (``base``), out of ``n``."""

    hits: int
    base: int
    n: int

    @property
    def fraction(self) -> float:
        """Recovered fraction, 0 = the corrupted run and 1 = the clean run (NaN when nothing can be recovered)."""
        return _normalised(self.hits, self.base, self.n)

    def interval(self) -> tuple[float, float]:
        """Wilson 95% interval of hits / n, through the same normalisation (the corrupted run's rate taken as known)."""
        low, high = wilson_interval(self.hits, self.n)
        return _normalised(low * self.n, self.base, self.n), _normalised(high * self.n, self.base, self.n)


def _normalised(hits, base, n):
    """(hits / n - base / n) / (1 - base / n), elementwise for tensors; NaN where n == 0 or base == n."""
    if isinstance(n, Tensor):
        return (hits - base) / (n - base).where(n > base, torch.nan)
    return (hits - base) / (n - base) if n > base else float("nan")


@dataclass(frozen=True)
class StepRecovery:
    """Recovered fraction of the scored answer slots per patched site (0 = corrupted run, 1 = clean run)."""

    resid_pre: Float[Tensor, "layer pos"]
    head_out: Float[Tensor, "layer head"]
    extra: dict[str, SlotCounts]  # the named sites of ``patch_by_step(extra_sites=...)``, with their counts


@dataclass(frozen=True)
class StepPatching:
    """Patching at one step, kept per pair and answer slot so that any set of slots can be scored.

    Sites, in the order of ``patched``: every residual-stream (layer, position), layer-major, then the named
    ``extra_names`` sites, then every head output (layer-major)."""

    step: int
    clean: Int[Tensor, "pair slot"]  # final tokens of the clean run
    clean_commit_step: Int[Tensor, "pair slot"]
    corrupted: Int[Tensor, "pair slot"]  # final tokens of the unpatched corrupted run
    corrupted_commit_step: Int[Tensor, "pair slot"]
    patched: Int[Tensor, "site pair slot"]  # final tokens of the corrupted run patched at ``step`` at each site
    patched_commit_step: Int[Tensor, "site pair slot"]
    n_layers: int
    seq: int
    n_heads: int
    extra_names: tuple[str, ...]

    @property
    def same_first(self) -> Bool[Tensor, " pair"]:
        """Pairs whose clean and corrupted runs commit the same slots at step 0. Only there do the two runs have
        their masks at the same slots at a later step, so that patching the clean pass compares like with like."""
        return ((self.clean_commit_step == 0) == (self.corrupted_commit_step == 0)).all(-1)

    def recovery(self, slots: SlotChoice = "open", pairs: Bool[Tensor, " pair"] | None = None) -> StepRecovery:
        """Score the chosen answer slots of the chosen pairs (default: all). ``slots``: ``"open"``, every slot
        still masked before the step; ``"now"``, the slots the patched run commits at this step; ``"later"``,
        those it commits at later steps; an index, that answer slot when still masked before the step. Scoring
        the open slots at step 0 mixes the token committed then with those committed later; "now" compares like
        with like across steps."""
        n_slots = self.clean.shape[1]
        opened = (self.corrupted_commit_step >= self.step).expand_as(self.patched)  # the same before the step
        if slots == "open":
            chosen = opened
        elif slots == "now":
            chosen = self.patched_commit_step == self.step
        elif slots == "later":
            chosen = self.patched_commit_step > self.step
        elif isinstance(slots, int) and not isinstance(slots, bool) and 0 <= slots < n_slots:
            chosen = opened & (torch.arange(n_slots) == slots)
        else:
            raise ValueError(f"slots={slots!r}: choose 'open', 'now', 'later' or an answer slot in 0..{n_slots - 1}")
        if pairs is not None:
            chosen = chosen & pairs[:, None]
        hits = ((self.patched == self.clean) & chosen).sum((1, 2))  # [site]
        base = ((self.corrupted == self.clean) & chosen).sum((1, 2))
        n = chosen.sum((1, 2))
        fraction = _normalised(hits.double(), base.double(), n.double()).float()
        n_grid, n_extra = self.n_layers * self.seq, len(self.extra_names)
        extra = {name: SlotCounts(int(hits[n_grid + k]), int(base[n_grid + k]), int(n[n_grid + k]))
                 for k, name in enumerate(self.extra_names)}
        return StepRecovery(fraction[:n_grid].reshape(self.n_layers, self.seq),
                            fraction[n_grid + n_extra :].reshape(self.n_layers, self.n_heads), extra)

    # the default score (every slot still open before the step) as plain fields
    @property
    def resid_pre(self) -> Float[Tensor, "layer pos"]:
        return self.recovery().resid_pre

    @property
    def head_out(self) -> Float[Tensor, "layer head"]:
        return self.recovery().head_out

    @property
    def extra(self) -> dict[str, float]:
        return {name: counts.fraction for name, counts in self.recovery().extra.items()}

    @property
    def open_slots(self) -> int:
        """Slots per prompt still masked before this step."""
        return int((self.corrupted_commit_step[0] >= self.step).sum())

    @property
    def scored(self) -> int:
        """Open slots over all pairs."""
        return int((self.corrupted_commit_step >= self.step).sum())

    @property
    def corrupted_agreement(self) -> float:
        """Fraction of the open slots on which the unpatched corrupted run already has the clean run's token."""
        opened = self.corrupted_commit_step >= self.step
        return float(((self.corrupted == self.clean) & opened).sum() / opened.sum())


def patch_by_step(lm, pairs: PatchingPairs, steps: list[int], extra_sites: dict[str, tuple[int, tuple]] | None = None,
                  sites_per_pass: int | None = None) -> list[StepPatching]:
    """Generate clean and corrupted answers (one token per step), then patch every residual-stream
    (layer, position), every head output and each named residual-stream site of ``extra_sites`` (e.g.
    several positions at once) at each step in ``steps``, rerunning from that step (``sites_per_pass``
    bounds the repeated batch, as in :func:`revlens.lm.generation.patch_generation`)."""
    n_tokens = int((pairs.clean[0] == lm.mask_token_id).sum())
    n_layers, seq, n_heads = lm.cfg.n_layers, pairs.clean.shape[1], lm.cfg.n_heads
    names = [t.format(layer=l) for t in (RESID_PRE, HEAD_Z) for l in range(n_layers)]
    clean = generate(lm, pairs.clean, n_tokens, cache_names=names, cache_steps=steps)
    corrupted = generate(lm, pairs.corrupted, n_tokens)
    extra_sites = extra_sites or {}
    results = []
    for step in steps:
        patched = [patch_generation(lm, corrupted, clean.cache, hook, sites, step, sites_per_pass=sites_per_pass)
                   for hook, sites in ((RESID_PRE, resid_pre_sites(n_layers, seq) + list(extra_sites.values())),
                                       (HEAD_Z, head_out_sites(n_layers, n_heads)))]
        results.append(StepPatching(step, clean.answer.cpu(), clean.commit_step.cpu(), corrupted.answer.cpu(),
                                    corrupted.commit_step.cpu(), torch.cat([p.answer.cpu() for p in patched]),
                                    torch.cat([p.commit_step.cpu() for p in patched]), n_layers, seq, n_heads,
                                    tuple(extra_sites)))
    return results


def first_slot_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per direction and split: how often the answer's first token is committed first (Wilson 95% interval),
    and the accuracy of the token committed at the first and at the last step."""
    rows = []
    for (direction, split), group in table.groupby(["direction", "split"]):
        first = group[group.step == 0]
        k, n = int((first.slot == 0).sum()), len(first)
        low, high = wilson_interval(k, n)
        last = group[group.step == group.groupby("fact").step.transform("max")]
        rows.append({"direction": direction, "split": split, "queries": n, "first token first": k / n,
                     "95% low": low, "95% high": high,
                     "acc. token committed first": first.correct.mean(),
                     "acc. token committed last": last.correct.mean()})
    return pd.DataFrame(rows).set_index(["direction", "split"])


def _first_slots(table: pd.DataFrame, first: str, second: str) -> pd.DataFrame:
    """Per fact: the slot each of the two directions commits at step 0, with the fact's relation and person when
    ``table`` has them."""
    starts = table[table.step == 0].pivot_table(index="fact", columns="direction", values="slot")
    starts = starts[list(dict.fromkeys((first, second)))]  # one column when both are the same direction
    info = [c for c in ("relation", "person") if c in table]
    return starts.join(table.groupby("fact")[info].first()) if info else starts


def _null_summary(prefix: str, shuffled: Float[Tensor, " shuffle"], observed: float) -> dict:
    """Mean, central 95% range and the share of shuffles at least as high as ``observed``."""
    return {f"{prefix} mean": float(shuffled.mean()), f"{prefix} 2.5%": float(shuffled.quantile(0.025)),
            f"{prefix} 97.5%": float(shuffled.quantile(0.975)),
            f"{prefix} >= observed": float((shuffled >= observed - 1e-12).double().mean())}


def _cluster_permutation(labels: list, gen: torch.Generator) -> Int[Tensor, " fact"]:
    """A permutation of the facts that moves whole clusters (facts sharing a label, in their order) onto other
    clusters of the same size."""
    members: dict = defaultdict(list)
    for position, label in enumerate(labels):
        members[label].append(position)
    by_size: dict[int, list[list[int]]] = defaultdict(list)
    for group in members.values():
        by_size[len(group)].append(group)
    out = torch.empty(len(labels), dtype=torch.long)
    for groups in by_size.values():
        block = torch.tensor(groups)  # [cluster, member]
        out[block.flatten()] = block[torch.randperm(len(groups), generator=gen)].flatten()
    return out


def order_agreement(table: pd.DataFrame, first: str, second: str, shuffles: int = 2000, seed: int = 0,
                    cluster: str | None = None) -> dict:
    """How often a fact's two queries commit the same slot first, against the agreement when the two orders are
    unrelated: the ``second`` orders paired with the ``first`` ones at random (``shuffled``), and, with ``cluster``
    (a column of ``table`` such as ``"person"``), reassigned by whole clusters, each cluster's facts kept together
    (``clusters shuffled``). Facts of one person share a name and tend to share an order, so they are not
    independent and the fact-level null is too narrow. Returns the observed agreement and, per null, its mean,
    central 95% range and the share of shuffles at least as high as observed."""
    starts = _first_slots(table, first, second)
    a, b = (torch.tensor(starts[d].to_numpy()) for d in (first, second))
    observed = float((a == b).double().mean())
    gen = torch.Generator().manual_seed(seed)
    out = {"facts": len(a), "observed": observed}
    out |= _null_summary("shuffled", torch.stack([(a == b[torch.randperm(len(b), generator=gen)]).double().mean()
                                                  for _ in range(shuffles)]), observed)
    if cluster is not None:
        labels = starts[cluster].tolist()
        out["clusters"] = len(set(labels))
        out |= _null_summary("clusters shuffled", torch.stack(
            [(a == b[_cluster_permutation(labels, gen)]).double().mean() for _ in range(shuffles)]), observed)
    return out


def _pair_agreement(a: Int[Tensor, " fact"], b: Int[Tensor, " fact"], group: Int[Tensor, " fact"]
                    ) -> tuple[Int[Tensor, ""], Int[Tensor, ""]]:
    """Over ordered pairs (i, j) of facts in the same group, i == j included: how many have a[i] == b[j], and how
    many pairs there are (from per-group counts of each value, without listing the pairs)."""
    n_values, n_groups = int(max(a.max(), b.max())) + 1, int(group.max()) + 1
    count_a, count_b = (torch.bincount(group * n_values + x, minlength=n_groups * n_values) for x in (a, b))
    sizes = torch.bincount(group, minlength=n_groups)
    return (count_a * count_b).sum(), (sizes * sizes).sum()


def namesake_agreement(table: pd.DataFrame, first: str, second: str, slot: int, shuffles: int = 2000,
                       seed: int = 0) -> dict:
    """How often a fact's ``first`` query commits the same slot first as the ``second`` query of a *namesake's*
    fact: a fact of the same relation about another person whose answer has the same gold token at ``slot`` (for
    two-token names, slot 0: the same first name). Over all such ordered pairs, against the same count with the
    persons' tokens at ``slot`` dealt out at random among the persons. If a name token's own ease of prediction (its
    frequency in training, say) set the order, namesakes would agree above that null; a fact's own two queries
    agreeing while namesakes do not points at the person, not at the shared token."""
    starts = _first_slots(table, first, second)
    a, b = (torch.tensor(starts[d].to_numpy(), dtype=torch.long) for d in (first, second))
    token = table[table.slot == slot].groupby("fact").gold.first().loc[starts.index]
    person_codes, _ = pd.factorize(starts.person)
    person_token = pd.Series(token.to_numpy(), index=person_codes).groupby(level=0).agg(set)
    if (person_token.map(len) > 1).any():
        raise ValueError(f"a person's facts disagree on the answer's token at slot {slot}")
    _, token_codes = torch.tensor(person_token.map(min).to_numpy()).unique(return_inverse=True)  # [person]
    person = torch.tensor(person_codes)
    relation = torch.tensor(pd.factorize(starts.relation)[0])
    n_relations = int(relation.max()) + 1
    own = person * n_relations + relation  # [fact]: pairs within one person are not namesakes
    same_person_hits, same_person_pairs = _pair_agreement(a, b, own)

    def namesakes(tokens: Int[Tensor, " person"]) -> tuple[int, int]:  # agreements and pairs between namesakes
        hits, pairs = _pair_agreement(a, b, tokens[person] * n_relations + relation)
        return int(hits - same_person_hits), int(pairs - same_person_pairs)

    hits, pairs = namesakes(token_codes)
    group = token_codes[person] * n_relations + relation
    partners = torch.bincount(group)[group] - torch.bincount(own)[own]  # per fact: its namesakes' facts
    gen = torch.Generator().manual_seed(seed)
    shuffled = []
    for _ in range(shuffles):
        k, n = namesakes(token_codes[torch.randperm(len(token_codes), generator=gen)])
        shuffled.append(k / n if n else float("nan"))
    observed = hits / pairs if pairs else float("nan")
    return {"pairs": pairs, "facts": int((partners > 0).sum()), "observed": observed} | _null_summary(
        "shuffled", torch.tensor(shuffled, dtype=torch.float64), observed)
