"""Accuracy and answer log-probability on the toy world's named evaluation sets.

Accuracy is exact-token match: the argmax over the *whole* vocabulary at the mask's readout
position must be the answer token. Chance is 1 / n_facts (a guess within the right alphabet).
Exact accuracy alone hides *type confusion* (the model knows which A, but a B-alphabet token
wins the argmax), so every set also reports accuracy within the answer's alphabet, the share of
argmaxes inside it, the gold answer's logit margin and its rank (:func:`answer_metrics`).
A set the model cannot answer by construction -- "[M] r B" for a left-to-right model, whose first
position has nothing before it -- is reported as NaN, not as zero.

:func:`evaluate` scores one model; :func:`evaluate_instances` scores K stacked instances of one
architecture (as :mod:`revlens.training` holds them) with one ``vmap``-ed forward pass per set and
gives each instance exactly the numbers :func:`evaluate` gives it alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor
from torch.func import vmap

from revlens.controls import AttentionControl, attention_control_hooks
from revlens.model import ToyTransformer, functional_logits
from revlens.objectives import READOUTS, Objective
from revlens.readout import logits_at_masks, read_position, readable
from revlens.world import EVAL_SETS, EvalSet, ReversalWorld

StackedForward = Callable[[Tensor, Tensor | None], Float[Tensor, "instance batch pos vocab"]]
"""``forward(tokens, positions)``: logits of every instance; ``positions`` are the eval set's ids (or None)."""


@torch.no_grad()
def evaluate(model: ToyTransformer, world: ReversalWorld, objective: Objective) -> dict[str, float]:
    """``{set}_{metric}`` for each eval set and each of :data:`ANSWER_METRICS`, plus ``chance``."""
    _check_vocabulary(model, world)
    was_training = model.training
    model.eval()
    (metrics,) = _score(lambda tokens, positions: _run(model, tokens, positions)[None], 1, model, world, objective)
    model.train(was_training)
    return metrics


@torch.no_grad()
def evaluate_instances(
    model: ToyTransformer, params: dict[str, Tensor], world: ReversalWorld, objective: Objective
) -> list[dict[str, float]]:
    """:func:`evaluate` for each of K instances of ``model``'s architecture whose parameters are
    stacked in ``params`` (each ``[instance, *shape]``), in one vmapped forward pass per set."""
    _check_vocabulary(model, world)
    n_instances = len(next(iter(params.values())))
    if any(len(p) != n_instances for p in params.values()):
        raise ValueError("every stacked parameter needs the same number of instances")

    def forward(tokens: Tensor, positions: Tensor | None) -> Tensor:
        return vmap(lambda p: functional_logits(model, p, tokens, positions))(params)

    return _score(forward, n_instances, model, world, objective)


def _run(model: ToyTransformer, tokens: Tensor, positions: Tensor | None, **kwargs) -> Tensor:
    """``model(tokens)``, passing position ids only where the world has them (``kwargs``: run_with_hooks')."""
    extra = {} if positions is None else {"positions": positions}
    if kwargs:
        return model.run_with_hooks(tokens, **extra, **kwargs)
    return model(tokens, **extra)


def eval_set_names(world: ReversalWorld) -> tuple[str, ...]:
    """The world's evaluation sets (a routing world has its own; see :mod:`revlens.routing`)."""
    return getattr(world, "eval_set_names", EVAL_SETS)


def _check_vocabulary(model: ToyTransformer, world: ReversalWorld) -> None:
    if model.cfg.d_vocab != world.d_vocab:
        raise ValueError(f"model vocabulary ({model.cfg.d_vocab}) does not match the world's ({world.d_vocab})")


def _score(
    forward: StackedForward, n_instances: int, model: ToyTransformer, world: ReversalWorld, objective: Objective
) -> list[dict[str, float]]:
    metrics: list[dict[str, float]] = [{} for _ in range(n_instances)]
    for name in eval_set_names(world):
        for row, set_metrics in zip(metrics, _score_set(forward, n_instances, model, world, objective, name)):
            row.update(set_metrics)
    for row in metrics:
        row["chance"] = world.chance
    return metrics


def _score_set(
    forward: StackedForward, n_instances: int, model: ToyTransformer, world: ReversalWorld, objective: Objective, name: str
) -> list[dict[str, float]]:
    """Per instance, the metrics of eval set ``name`` (see :func:`answer_metrics`), keys prefixed by it."""
    readout = READOUTS[objective]
    causal = readout == "shifted" and model.cfg.attention_dir == "causal"
    es = world.eval_set(name)
    if not readable(es.mask_pos, readout):
        return [{f"{name}_{key}": math.nan for key in ANSWER_METRICS} for _ in range(n_instances)]
    all_logits = logits_at_masks(
        lambda tokens: forward(tokens, es.positions), es.prompts, world.mask_id, readout=readout, causal=causal
    )[:, :, 0]
    # instance by instance: the same reductions as alone
    return [{f"{name}_{k}": v for k, v in answer_metrics(logits, es).items()} for logits in all_logits]


ANSWER_METRICS: tuple[str, ...] = ("acc", "logp", "acc_in_type", "argmax_in_type", "margin", "rank")


def answer_metrics(logits: Float[Tensor, "n vocab"], es: EvalSet) -> dict[str, float]:
    """How the model's logits at the mask treat the gold answer, averaged over the set's prompts.

    ``acc``: the argmax over the whole vocabulary is the answer. ``logp``: mean log-probability of
    the answer. ``acc_in_type``: the argmax over the answer's alphabet (``es.candidates``) is the
    answer -- a model that knows *which* A but is pulled to the wrong type scores here and not in
    ``acc``. ``argmax_in_type``: share of argmaxes inside the answer's alphabet (1 minus the type
    confusion). ``margin``: mean of (gold logit - best other logit), positive exactly when correct.
    ``rank``: median rank of the gold answer in the whole vocabulary (1 = top; ties counted
    against the answer).
    """
    gold = logits.gather(1, es.answers[:, None])[:, 0]
    argmax = logits.argmax(-1)
    in_type = torch.isin(argmax, es.candidates)
    best_in_type = es.candidates[logits[:, es.candidates].argmax(-1)]
    others = logits.scatter(1, es.answers[:, None], -math.inf)
    rank = 1 + (logits > gold[:, None]).sum(-1) + (others == gold[:, None]).sum(-1)
    return {
        "acc": (argmax == es.answers).float().mean().item(),
        "logp": (gold - logits.logsumexp(-1)).mean().item(),
        "acc_in_type": (best_in_type == es.answers).float().mean().item(),
        "argmax_in_type": in_type.float().mean().item(),
        "margin": (gold - others.max(-1).values).mean().item(),
        "rank": rank.float().median().item(),
    }


@torch.no_grad()
def evaluate_under_control(
    model: ToyTransformer,
    world: ReversalWorld,
    objective: Objective,
    control: AttentionControl = "uniform",
    sets: tuple[str, ...] = ("inplace", "reverse"),
) -> dict[str, float]:
    """``{set}_acc_{control}`` (and the other answer metrics) with the readout position's attention
    replaced by ``control`` in every layer (:mod:`revlens.controls`).

    If reverse accuracy survives a uniform pattern, answering does not depend on where the mask
    attends, and the world cannot test a routing claim.
    """
    _check_vocabulary(model, world)
    readout = READOUTS[objective]
    out: dict[str, float] = {}
    for name in sets:
        es = world.eval_set(name)
        if readable(es.mask_pos, readout):
            hooks = attention_control_hooks(model, read_position(es.mask_pos, readout), control)
            forward: StackedForward = lambda tokens, positions, hooks=hooks: _run(model, tokens, positions, fwd_hooks=hooks)[None]
        else:
            forward = None  # type: ignore[assignment]  # _score_set reports NaN without calling it
        (metrics,) = _score_set(forward, 1, model, world, objective, name)
        out.update({f"{key}_{control}": value for key, value in metrics.items()})
    return out
