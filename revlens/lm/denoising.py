"""Fact queries answered by denoising steps: unmasking order, routes per step, and patching at a step.

Built on :mod:`revlens.lm.generation`. Each query's answer slots are generated in as many steps as
the answer has tokens (one token per step, low-confidence remasking, greedy: the rule revlens'
fact scorer uses), prompts of one shape in one batch.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from revlens.facts import EncodedQuery, FactSet, encode_query
from revlens.lm.analysis import PatchingPairs, _last_token_of
from revlens.lm.generation import GenerationTrace, generate, patch_generation
from revlens.patching import HEAD_Z, RESID_PRE, head_out_sites, resid_pre_sites
from revlens.routes import PATTERN_HOOK


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
    """One row per query and answer token: when it was committed, its confidence, whether it is the gold token."""
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
                                 "relation": facts.facts[i].relation, "slot": slot, "step": int(commit[k, slot]),
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
        rows = torch.arange(len(group.facts))[:, None]
        queries = lm.read_position(trace.slots).cpu()  # [fact, slot]
        per_step = [torch.stack([trace.cache[s][name][rows, :, queries, keys[:, None]].cpu() for name in names], 2)
                    for s in range(trace.n_steps)]  # each [fact, slot, layer, head]
        stacked = torch.stack(per_step, 1)
        for k, i in enumerate(group.facts):
            weights[i], commits[i] = stacked[k], trace.commit_step[k].cpu()
    return StepRoutes(torch.stack([weights[i] for i in indices]), torch.stack([commits[i] for i in indices]))


@dataclass(frozen=True)
class StepPatching:
    """Patching at one step: the fraction of the slots still open at that step whose final token is the
    clean run's, per site, normalised so 0 = the corrupted run and 1 = the clean run."""

    step: int
    resid_pre: Float[Tensor, "layer pos"]
    head_out: Float[Tensor, "layer head"]
    extra: dict[str, float]  # the named residual-stream sites of ``patch_by_step(extra_sites=...)``
    corrupted_agreement: float  # fraction of those slots on which the unpatched corrupted run already agrees
    open_slots: int  # slots per prompt still masked before this step
    scored: int  # slots scored over all pairs

    def interval(self, recovered: float) -> tuple[float, float]:
        """Wilson 95% interval of a recovered fraction, through the same normalisation."""
        base = self.corrupted_agreement
        low, high = wilson_interval(round((base + recovered * (1 - base)) * self.scored), self.scored)
        return (low - base) / (1 - base), (high - base) / (1 - base)


def patch_by_step(lm, pairs: PatchingPairs, steps: list[int], extra_sites: dict[str, tuple[int, tuple]] | None = None,
                  sites_per_pass: int | None = None) -> list[StepPatching]:
    """Generate clean and corrupted answers (one token per step), then patch every residual-stream
    (layer, position), every head output and each named residual-stream site of ``extra_sites`` (e.g.
    several positions at once) at each step in ``steps``, rerunning from that step (``sites_per_pass``
    bounds the repeated batch, as in :func:`revlens.lm.generation.patch_generation`)."""
    n_tokens = int((pairs.clean[0] == lm.mask_token_id).sum())
    n_layers, seq = lm.cfg.n_layers, pairs.clean.shape[1]
    names = [t.format(layer=l) for t in (RESID_PRE, HEAD_Z) for l in range(n_layers)]
    clean = generate(lm, pairs.clean, n_tokens, cache_names=names, cache_steps=steps)
    corrupted = generate(lm, pairs.corrupted, n_tokens)
    extra_sites = extra_sites or {}
    results = []
    for step in steps:
        still_open = corrupted.commit_step >= step  # [batch, slot]

        def agreement(answer: Tensor) -> Tensor:  # [..., batch, slot] -> [...]
            return ((answer == clean.answer) & still_open).sum((-1, -2)).float() / still_open.sum()

        base = float(agreement(corrupted.answer))
        recovered = []
        for hook, sites in ((RESID_PRE, resid_pre_sites(n_layers, seq) + list(extra_sites.values())),
                            (HEAD_Z, head_out_sites(n_layers, lm.cfg.n_heads))):
            patched = patch_generation(lm, corrupted, clean.cache, hook, sites, step, sites_per_pass=sites_per_pass)
            recovered.append((agreement(patched.answer).cpu() - base) / (1 - base))
        resid, heads = recovered
        results.append(StepPatching(step, resid[: n_layers * seq].reshape(n_layers, seq),
                                    heads.reshape(n_layers, lm.cfg.n_heads),
                                    dict(zip(extra_sites, resid[n_layers * seq :].tolist())), base,
                                    int(still_open[0].sum()), int(still_open.sum())))
    return results


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default)."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return centre - half, centre + half


def first_slot_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per direction and split: how often the answer's first token is committed first (Wilson 95% interval),
    and the accuracy of the token committed at the first and at the last step."""
    rows = []
    for (direction, split), group in table.groupby(["direction", "split"]):
        first = group[group.step == 0]
        k, n = int((first.slot == 0).sum()), len(first)
        low, high = wilson_interval(k, n)
        rows.append({"direction": direction, "split": split, "queries": n, "first token first": k / n,
                     "95% low": low, "95% high": high,
                     "acc. token committed first": first.correct.mean(),
                     "acc. token committed last": group[group.step == group.groupby("fact").step.transform("max")].correct.mean()})
    return pd.DataFrame(rows).set_index(["direction", "split"])


def order_agreement(table: pd.DataFrame, first: str, second: str, shuffles: int = 2000, seed: int = 0) -> dict:
    """How often a fact's two queries commit the same slot first, against the same facts' orders paired at
    random (the agreement expected if the two orders were unrelated): observed, shuffled mean, shuffled 95% range."""
    starts = table[table.step == 0].pivot_table(index="fact", columns="direction", values="slot")
    a, b = starts[first].to_numpy(), starts[second].to_numpy()
    gen = torch.Generator().manual_seed(seed)
    shuffled = torch.stack([torch.tensor(a == b[torch.randperm(len(b), generator=gen).numpy()], dtype=torch.float).mean()
                            for _ in range(shuffles)])
    return {"facts": len(a), "observed": float((a == b).mean()), "shuffled mean": float(shuffled.mean()),
            "shuffled 2.5%": float(shuffled.quantile(0.025)), "shuffled 97.5%": float(shuffled.quantile(0.975))}
