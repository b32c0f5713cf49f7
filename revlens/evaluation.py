"""Accuracy and answer log-probability on the toy world's named evaluation sets.

Accuracy is exact-token match: the argmax over the *whole* vocabulary at the mask's readout
position must be the answer token. Chance is 1 / n_facts (a guess within the right alphabet).
A set the model cannot answer by construction -- "[M] r B" for a left-to-right model, whose first
position has nothing before it -- is reported as NaN, not as zero.
"""

from __future__ import annotations

import math

import torch

from revlens.model import HookedEncoder
from revlens.objectives import READOUTS, Objective
from revlens.readout import logits_at_masks, readable
from revlens.world import EVAL_SETS, ReversalWorld


@torch.no_grad()
def evaluate(model: HookedEncoder, world: ReversalWorld, objective: Objective) -> dict[str, float]:
    """``{set}_acc`` and ``{set}_logp`` (mean log-probability of the answer) for each eval set,
    plus ``chance``."""
    if model.cfg.d_vocab != world.d_vocab:
        raise ValueError(f"model vocabulary ({model.cfg.d_vocab}) does not match the world's ({world.d_vocab})")
    readout = READOUTS[objective]
    causal = readout == "shifted" and model.cfg.attention_dir == "causal"
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    for name in EVAL_SETS:
        es = world.eval_set(name)
        if not readable(es.mask_pos, readout):
            metrics[f"{name}_acc"] = metrics[f"{name}_logp"] = math.nan
            continue
        logits = logits_at_masks(model, es.prompts, world.mask_id, readout=readout, causal=causal)[:, 0]
        logp = logits.log_softmax(-1).gather(1, es.answers[:, None])[:, 0]
        metrics[f"{name}_acc"] = (logits.argmax(-1) == es.answers).float().mean().item()
        metrics[f"{name}_logp"] = logp.mean().item()
    metrics["chance"] = world.chance
    model.train(was_training)
    return metrics
