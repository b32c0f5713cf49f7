"""Training objectives (masked diffusion and next-token) and how each one reads out predictions.

Every objective turns a batch of clean sentences into ``(inputs, targets, weights)`` and the loss is
always ``sum(weights * CE(logits, targets)) / batch``, so one training loop (and one ``vmap``) serves
all of them:

* ``mdm`` (LLaDA / SMDM): draw t ~ U(0, 1] per sentence, mask each token with probability
  p = (1 - eps) t + eps, and weight the cross-entropy at masked positions by 1 / (p * seq_len).
  This is LLaDA's pre-training loss (Nie et al. 2025, "Large Language Diffusion Models"; eps = 1e-3
  in their released pre-training code); its expectation over t upper-bounds the negative
  log-likelihood. The floor eps keeps the weight 1/p below 1/eps: with eps = 0 the weight 1/t is
  unbounded and the loss estimator's second moment, E[1/t] over t ~ U(0, 1], is infinite.
* ``bert``: mask each token with a fixed probability (15%) and weight masked positions by
  1 / (rate * seq_len) -- BERT-style masked language modelling, for the ablations.
* ``arm``: next-token prediction; position i predicts token i + 1, weights 1 / (seq_len - 1).
* ``inplace``: mask only sequence index 0 (the A slot of :mod:`revlens.routing` sentences) and
  score it with weight 1: the "in-place only" arm, in which no training prediction reads a key
  placed *before* the mask, so the reverse direction's route is never trained directly. (In
  :class:`revlens.world.ReversalWorld` index 0 of a control sentence "B r A" is B; use it there
  only knowing that.)

The readout says where a model trained with an objective keeps its answer for a masked slot:
``same_position`` (LLaDA, our MDMs) or ``shifted`` (position i - 1 predicts token i: ARMs, Dream); see
:data:`READOUTS` and, for the convention itself, :mod:`revlens.readout`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from revlens.config import check_choice
from revlens.readout import Readout

Objective = Literal["mdm", "bert", "arm", "inplace"]
OBJECTIVES: tuple[str, ...] = ("mdm", "bert", "arm", "inplace")
READOUTS: dict[str, Readout] = {"mdm": "same_position", "bert": "same_position", "arm": "shifted", "inplace": "same_position"}
INPLACE_SLOT = 0
"""The one sequence index the ``inplace`` objective masks and scores."""
BERT_MASK_RATE = 0.15
MDM_MASK_EPS = 1e-3
"""LLaDA's floor on the masking probability, p = (1 - eps) t + eps."""


@dataclass(frozen=True)
class LossBatch:
    """Model inputs with per-position targets and loss weights (zero where there is no loss)."""

    inputs: Int[Tensor, "batch pos"]
    targets: Int[Tensor, "batch pos"]
    weights: Float[Tensor, "batch pos"]


def weighted_token_loss(
    logits: Float[Tensor, "batch pos vocab"],
    targets: Int[Tensor, "batch pos"],
    weights: Float[Tensor, "batch pos"],
) -> Float[Tensor, ""]:
    """sum_{b,i} w[b,i] * CE(logits[b,i], targets[b,i]) / batch.

    Written as ``-log_softmax(logits).gather(target)``: the same values and gradients, bit for bit, as
    ``F.cross_entropy(reduction="none")``, and about 10% faster per step under ``vmap`` on CPU.
    """
    ce = -logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    return (weights.flatten() * ce.flatten()).sum() / targets.shape[0]


def masked_batch(
    tokens: Int[Tensor, "*instance batch pos"],
    mask: Bool[Tensor, "*instance batch pos"],
    rate: Float[Tensor, "*instance batch"],
    mask_id: int,
) -> LossBatch:
    """Replace masked tokens by ``mask_id``; weight each masked position by 1 / (rate * seq_len)."""
    seq_len = tokens.shape[-1]
    inputs = tokens.masked_fill(mask, mask_id)
    weights = mask.float() / (rate[..., None] * seq_len)
    return LossBatch(inputs, tokens, weights)


def check_mask_eps(eps: float) -> None:
    """The floor must be a finite probability in [0, 1)."""
    if not (isinstance(eps, (int, float)) and 0.0 <= eps < 1.0):
        raise ValueError(f"mask_eps must be a number in [0, 1), got {eps!r}")


def _masking_probability(n: int, generator: torch.Generator, eps: float, stratified: bool = False) -> Float[Tensor, " n"]:
    """t ~ U(0, 1] per sentence and the floored masking probability p = (1 - eps) t + eps.

    ``stratified``: low-discrepancy t (Sahoo et al. 2024, MDLM): row k gets t_k = 1 - ((u + k / n) mod 1) for one
    u ~ U[0, 1), so a batch covers (0, 1] evenly; each t_k is still marginally U(0, 1], only the variance drops.
    """
    check_mask_eps(eps)
    if stratified:
        t = 1.0 - (torch.rand(1, generator=generator) + torch.arange(n) / n) % 1.0  # (0, 1]
    else:
        t = 1.0 - torch.rand(n, generator=generator)  # (0, 1]
    return (1.0 - eps) * t + eps if eps else t


def sample_mdm_mask(
    shape: tuple[int, int], generator: torch.Generator, eps: float = MDM_MASK_EPS
) -> tuple[Bool[Tensor, "batch pos"], Float[Tensor, " batch"]]:
    """t ~ U(0, 1] per sentence, p = (1 - eps) t + eps, then an independent Bernoulli(p) mask per token.

    Returns the mask and the masking probability p (the rate the loss divides by).
    """
    p = _masking_probability(shape[0], generator, eps)
    mask = torch.rand(shape, generator=generator) < p[:, None]
    return mask, p


def sample_span_mask(
    units: Int[Tensor, "batch pos"], generator: torch.Generator, eps: float = MDM_MASK_EPS, stratified: bool = False
) -> tuple[Bool[Tensor, "batch pos"], Float[Tensor, " batch"]]:
    """Masked diffusion with whole spans: like :func:`sample_mdm_mask`, but tokens sharing a unit id are
    masked together (one Bernoulli(p) per unit), e.g. every token of a two-word name at once.

    ``units[b, i]`` is the id (in ``[0, seq)``) of the span token i belongs to; a token alone in its span
    has its own id. Each token is still masked with probability p, so the 1 / (p * seq_len) weights keep
    their meaning; only the joint distribution changes (whole-entity masking, as in DiffER). ``stratified``:
    low-discrepancy t across the batch (see :func:`_masking_probability`).
    """
    p = _masking_probability(units.shape[0], generator, eps, stratified)
    unit_masked = torch.rand(units.shape, generator=generator) < p[:, None]
    return unit_masked.gather(1, units), p


def sample_mask(
    objective: Objective, shape: tuple[int, int], generator: torch.Generator, mask_eps: float = MDM_MASK_EPS
) -> tuple[Bool[Tensor, "batch pos"], Float[Tensor, " batch"]]:
    """The mask and per-sentence masking rate of a masked objective (``mdm`` or ``bert``)."""
    if objective == "mdm":
        return sample_mdm_mask(shape, generator, mask_eps)
    if objective == "bert":
        return torch.rand(shape, generator=generator) < BERT_MASK_RATE, torch.full((shape[0],), BERT_MASK_RATE)
    if objective == "inplace":  # deterministic: draws nothing, rate 1 / seq_len gives the slot weight 1
        mask = torch.zeros(shape, dtype=torch.bool)
        mask[:, INPLACE_SLOT] = True
        return mask, torch.full((shape[0],), 1.0 / shape[1])
    raise ValueError(f"objective {objective!r} does not mask tokens")


def next_token_batch(tokens: Int[Tensor, "*instance batch pos"]) -> LossBatch:
    """Inputs are the sentence; position i is scored on token i + 1."""
    seq_len = tokens.shape[-1]
    targets = torch.roll(tokens, -1, dims=-1)
    weights = torch.full(tokens.shape, 1.0 / (seq_len - 1))
    weights[..., -1] = 0.0
    return LossBatch(tokens, targets, weights)


def make_loss_batch(
    objective: Objective,
    tokens: Int[Tensor, "batch pos"],
    mask_id: int,
    generator: torch.Generator,
    mask_eps: float = MDM_MASK_EPS,
) -> LossBatch:
    """The training batch an objective builds from clean sentences (``mask_eps``: see ``sample_mdm_mask``)."""
    check_choice("objective", objective, OBJECTIVES)
    if objective == "arm":
        return next_token_batch(tokens)
    mask, rate = sample_mask(objective, tokens.shape, generator, mask_eps)
    return masked_batch(tokens, mask, rate, mask_id)


def sample_loss_batches(
    objective: Objective,
    sentences: Int[Tensor, "n pos"],
    batch_size: int,
    mask_id: int,
    generators: Sequence[torch.Generator],
    mask_eps: float = MDM_MASK_EPS,
) -> LossBatch:
    """One training batch per generator, stacked to ``[instance, batch, seq]``.

    Instance k draws its ``batch_size`` sentences (with replacement) and then its mask from
    ``generators[k]`` alone, in that order, so it gets exactly the batch a one-generator call gives.
    Only the draws run generator by generator; masking and weighting run once on the stack.
    """
    check_choice("objective", objective, OBJECTIVES)
    rows, masks, rates = [], [], []
    for generator in generators:
        rows.append(torch.randint(len(sentences), (batch_size,), generator=generator))
        if objective != "arm":
            mask, rate = sample_mask(objective, (batch_size, sentences.shape[1]), generator, mask_eps)
            masks.append(mask)
            rates.append(rate)
    tokens = sentences[torch.stack(rows)]
    if objective == "arm":
        return next_token_batch(tokens)
    return masked_batch(tokens, torch.stack(masks), torch.stack(rates), mask_id)
