"""Accuracy and answer log-probability on the toy world's named evaluation sets.

Accuracy is exact-token match: the argmax over the *whole* vocabulary at the mask's readout
position must be the answer token. Chance is 1 / n_facts (a guess within the right alphabet).
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

from revlens.model import HookedEncoder, functional_logits
from revlens.objectives import READOUTS, Objective
from revlens.readout import logits_at_masks, readable
from revlens.world import EVAL_SETS, ReversalWorld

StackedForward = Callable[[Tensor], Float[Tensor, "instance batch pos vocab"]]


@torch.no_grad()
def evaluate(model: HookedEncoder, world: ReversalWorld, objective: Objective) -> dict[str, float]:
    """``{set}_acc`` and ``{set}_logp`` (mean log-probability of the answer) for each eval set,
    plus ``chance``."""
    _check_vocabulary(model, world)
    was_training = model.training
    model.eval()
    (metrics,) = _score(lambda tokens: model(tokens)[None], 1, model, world, objective)
    model.train(was_training)
    return metrics


@torch.no_grad()
def evaluate_instances(
    model: HookedEncoder, params: dict[str, Tensor], world: ReversalWorld, objective: Objective
) -> list[dict[str, float]]:
    """:func:`evaluate` for each of K instances of ``model``'s architecture whose parameters are
    stacked in ``params`` (each ``[instance, *shape]``), in one vmapped forward pass per set."""
    _check_vocabulary(model, world)
    n_instances = len(next(iter(params.values())))
    if any(len(p) != n_instances for p in params.values()):
        raise ValueError("every stacked parameter needs the same number of instances")

    def forward(tokens: Tensor) -> Tensor:
        return vmap(lambda p: functional_logits(model, p, tokens))(params)

    return _score(forward, n_instances, model, world, objective)


def _check_vocabulary(model: HookedEncoder, world: ReversalWorld) -> None:
    if model.cfg.d_vocab != world.d_vocab:
        raise ValueError(f"model vocabulary ({model.cfg.d_vocab}) does not match the world's ({world.d_vocab})")


def _score(
    forward: StackedForward, n_instances: int, model: HookedEncoder, world: ReversalWorld, objective: Objective
) -> list[dict[str, float]]:
    readout = READOUTS[objective]
    causal = readout == "shifted" and model.cfg.attention_dir == "causal"
    metrics: list[dict[str, float]] = [{} for _ in range(n_instances)]
    for name in EVAL_SETS:
        es = world.eval_set(name)
        if not readable(es.mask_pos, readout):
            for row in metrics:
                row[f"{name}_acc"] = row[f"{name}_logp"] = math.nan
            continue
        all_logits = logits_at_masks(forward, es.prompts, world.mask_id, readout=readout, causal=causal)[:, :, 0]
        for row, logits in zip(metrics, all_logits):  # instance by instance: the same reductions as alone
            logp = logits.log_softmax(-1).gather(1, es.answers[:, None])[:, 0]
            row[f"{name}_acc"] = (logits.argmax(-1) == es.answers).float().mean().item()
            row[f"{name}_logp"] = logp.mean().item()
    for row in metrics:
        row["chance"] = world.chance
    return metrics
