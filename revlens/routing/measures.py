"""Measurements on a trained model in the routing world.

The readout position's logits and layer-0 attention (:func:`mask_row`), where it attends and how the
two routes' scores agree (:func:`route_statistics`), the metrics of a model at its trained and
held-out offsets (:func:`routing_metrics`, :func:`held_out_offsets`) and the route-vs-storage
interventions and their controls (:func:`causal_split`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from revlens.routing.world import N_DISTRACTORS, ROUTING_EVAL_SETS, Arranged, RoutingWorld
from revlens.routes import route_at
from revlens.world import EvalSet



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
    pattern, scores = cache["blocks.0.attn.hook_pattern"], cache["blocks.0.attn.hook_attn_scores"]
    queries = torch.full((len(es.prompts),), row)
    on_d = route_at(pattern, queries[:, None], arranged.d_index).transpose(1, 2)  # [batch, head, distractor]
    return MaskRow(logits[:, row], route_at(pattern, queries, arranged.b_index), on_d,
                   route_at(scores, queries, arranged.b_index))


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


N_CTX = 68
"""Position ids the sweep's models accept: enough for delta = 32 and its held-out offset 33 (ids up to 67)."""
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


@torch.no_grad()
def storage_split(model, world: RoutingWorld) -> dict[str, float]:
    """Route vs storage in the reverse query of a model of any depth, where the storage half can fail.

    On the gap layout the in-place and the reverse prompt hold the same tokens in the same order (only the
    position ids differ; checked), so any activation of the in-place prompt can be written into the reverse one
    at the same sequence index. In one layer, keys and values carry no position (RoPE rotates queries and keys
    only), so the mask's whole score row decides the answer. From two layers on, the values a later layer reads
    at B are made from an earlier layer's output at B, which depends on B's own attention and so on the
    positions: the reverse prompt can then fail for what is stored at B, not only for where the mask looks.

    Accuracies on the reverse prompt (B's A): ``reverse_acc`` (its own), ``inplace_acc`` (the in-place prompt's).
    ``route_patched_acc``: the in-place prompt's mask score row (every key, every head) written in at every
    layer, the values left as they are; ``route_patched_first_acc`` / ``route_patched_last_acc``: at the first /
    the last layer only. ``storage_patched_acc``: the in-place prompt's values (``hook_v``, every position, every
    layer) written in, the mask's scores left as they are. ``both_patched_acc``: both; everything the mask reads
    is then the in-place prompt's, so it must equal ``inplace_acc`` (a check of the patching). Control:
    ``donor_storage_acc`` / ``donor_storage_donor_acc``: the route patched and the values taken from *another*
    fact's in-place prompt (the next prompt's): values that carry the fact give the donor's A, not B's.
    ``value_change_l{l}``: how far the reverse prompt's values at B differ from the in-place prompt's at layer
    l (norm of the difference over the in-place norm; 0 in the first layer, by construction). With MLPs:
    ``mlp_ablated_inplace_acc`` and ``mlp_ablated_route_patched_acc``, every MLP's output zeroed.

    Two controls on the in-place prompt say whether the storage half had the power to fail.
    ``value_ablated_l{l}_acc``: B's values at layer l (every head) replaced by their mean over the prompts, which
    keeps that mean (not each one's norm) and removes which fact they belong to; where this falls to a guess, the
    answer is read from what is stored at B in that layer. ``value_noise_l{l}_acc`` (from the second layer on): B's
    values at layer l moved, prompt by prompt, by a random direction (seeded) as long as that prompt's own
    reverse-vs-in-place difference there; where a change of that size in a random direction leaves the answer, the
    storage test at that layer was a weak one.
    """
    from revlens.evaluation import answer_metrics

    inplace, in_keys, _ = world.eval_prompts("inplace")
    reverse, rev_keys, _ = world.eval_prompts("reverse")
    if not torch.equal(inplace.prompts, reverse.prompts) or inplace.mask_pos != reverse.mask_pos:
        raise ValueError("storage_split needs prompts that hold the same tokens in the same order (the gap layout)")
    layers = range(model.cfg.n_layers)
    score, value, mlp = "blocks.{}.attn.hook_attn_scores", "blocks.{}.attn.hook_v", "blocks.{}.hook_mlp_out"
    names = [h.format(l) for l in layers for h in (score, value)]
    _, in_cache = model.run_with_cache(inplace.prompts, positions=inplace.positions, names_filter=lambda n: n in names)
    _, rev_cache = model.run_with_cache(reverse.prompts, positions=reverse.positions, names_filter=lambda n: n in names)
    mask_pos, batch = reverse.mask_pos, torch.arange(len(reverse.prompts))
    donor = dataclasses.replace(reverse, answers=reverse.answers.roll(-1))

    def write(name: str, fill):
        def hook(act: Tensor, hook=None) -> Tensor:  # noqa: ARG001
            act = act.clone()
            fill(act, in_cache[name])
            return act

        return (name, hook)

    def route(l: int):
        return write(score.format(l), lambda act, src: act.__setitem__((slice(None), slice(None), mask_pos), src[:, :, mask_pos]))

    def storage(l: int, shift: int = 0):
        return write(value.format(l), lambda act, src: act.copy_(src.roll(-shift, 0)))

    def at_b_of_inplace(name: str, change):
        at_b = (batch, in_keys.b_index)
        return write(name, lambda act, src: act.__setitem__(at_b, change(act[at_b])))

    def zero_mlp(l: int):
        return (mlp.format(l), lambda act, hook=None: torch.zeros_like(act))

    def acc(hooks, es=reverse, prompts=reverse) -> float:
        logits = model.run_with_hooks(prompts.prompts, positions=prompts.positions, fwd_hooks=hooks)[:, prompts.mask_pos]
        return answer_metrics(logits, es)["acc"]

    routes, values = [route(l) for l in layers], [storage(l) for l in layers]
    out = {"reverse_acc": acc([]), "inplace_acc": acc([], inplace, inplace), "route_patched_acc": acc(routes),
           "route_patched_first_acc": acc(routes[:1]), "route_patched_last_acc": acc(routes[-1:]),
           "storage_patched_acc": acc(values), "both_patched_acc": acc(routes + values)}
    donors = [storage(l, shift=1) for l in layers]
    out["donor_storage_acc"], out["donor_storage_donor_acc"] = acc(routes + donors), acc(routes + donors, donor)
    noise = torch.Generator().manual_seed(0)
    for l in layers:
        name = value.format(l)
        in_b = in_cache[name][batch, in_keys.b_index]  # [batch, head, d_head]
        rev_b = rev_cache[name][batch, rev_keys.b_index]
        out[f"value_change_l{l}"] = float((rev_b - in_b).norm() / in_b.norm())
        mean_b = in_b.mean(0)
        out[f"value_ablated_l{l}_acc"] = acc([at_b_of_inplace(name, lambda v, m=mean_b: m.expand_as(v))],
                                             inplace, inplace)
        if l > 0:
            direction = torch.randn(in_b.shape, generator=noise)
            shift = direction * ((rev_b - in_b).flatten(1).norm(dim=1) / direction.flatten(1).norm(dim=1)).view(-1, 1, 1)
            out[f"value_noise_l{l}_acc"] = acc([at_b_of_inplace(name, lambda v, d=shift: v + d)], inplace, inplace)
    if not model.cfg.attn_only:
        ablate = [zero_mlp(l) for l in layers]
        out["mlp_ablated_inplace_acc"] = acc(ablate, inplace, inplace)
        out["mlp_ablated_route_patched_acc"] = acc(routes + ablate)
    return out
