"""Train many settings at once when they share parameter shapes but differ in data or buffers.

:func:`revlens.training.train` stacks *seeds* of one setting. A sweep over offsets, world seeds
and RoPE bases has far more such settings: models whose parameters have the same names and shapes
but that train on other sentences (another offset, another world) or carry other buffers (the
RoPE tables of another base). :func:`train_stack` stacks their parameters *and buffers* along a
leading instance axis and ``vmap``s one forward pass over parameters, buffers, tokens and position
ids together; the backward pass is ordinary autograd on the summed loss (instances share nothing,
so each gets exactly its own gradient), and AdamW is element-wise.

Instance k draws its batches (and masks) from its own generator seeded with its own seed, so it
sees the data it would see trained alone. Trained alone (one member) it runs as a plain module
call with no ``vmap``; the stacked weights equal that bit for bit (``tests/test_routing.py``, for
members differing in offset, world seed and RoPE base, both objectives).

The ``arm`` objective (next-token prediction, for a causal model only) draws no masks: sequence
index i is scored on the token at index i + 1. That is "the next token" only when every sentence's
position ids run ``0, 1, 2, ...`` in sequence order (e.g. the routing world's filler layout);
:func:`train_stack` refuses other position ids (the gap layout's ``0, delta, o1, o2``) for it.

The ``inplace`` objective reads one slot, so only that slot is unembedded (``read``): the logits
cost a quarter of a full four-token unembedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
from jaxtyping import Int
from torch import Tensor
from torch.func import vmap

from revlens.config import EncoderConfig
from revlens.model import ToyTransformer, functional_logits, stack_parameters
from revlens.objectives import INPLACE_SLOT, masked_batch, next_token_batch, sample_mask, weighted_token_loss
from revlens.optim import AdamW
from revlens.training import StepProgress, TrainConfig, init_model

STACKABLE_OBJECTIVES: tuple[str, ...] = ("inplace", "mdm", "bert", "arm")


class PositionedWorld(Protocol):
    """A world whose training sentences come with position ids (e.g. :class:`revlens.routing.RoutingWorld`)."""

    mask_id: int
    d_vocab: int

    def training_data(self) -> tuple[Int[Tensor, "n pos"], Int[Tensor, "n pos"]]: ...


@dataclass(frozen=True)
class Member:
    """One model to train: its architecture (buffers may differ from the others'), world and seed."""

    model_cfg: EncoderConfig
    world: PositionedWorld
    seed: int


def _shape_signature(model: ToyTransformer) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()] + [
        (name, tuple(b.shape)) for name, b in model.named_buffers()
    ]


def _check_members(members: Sequence[Member], models: Sequence[ToyTransformer], data: Sequence[tuple[Tensor, Tensor]]) -> None:
    if not members:
        raise ValueError("train_stack needs at least one member")
    first = _shape_signature(models[0])
    for member, model, (tokens, positions) in zip(members, models, data):
        if _shape_signature(model) != first:
            raise ValueError(f"member with seed {member.seed} has other parameter or buffer shapes than the first")
        if member.model_cfg.replace(rotary_base=2.0) != members[0].model_cfg.replace(rotary_base=2.0):
            raise ValueError("stacked members may differ only in rotary_base (a buffer) among model settings")
        if tokens.shape != data[0][0].shape or positions.shape != tokens.shape:
            raise ValueError(f"member with seed {member.seed} has {tuple(tokens.shape)} training tokens, the first {tuple(data[0][0].shape)}")
        if member.world.d_vocab != member.model_cfg.d_vocab:
            raise ValueError(f"model d_vocab={member.model_cfg.d_vocab} does not match the world's {member.world.d_vocab}")
        if int(positions.max()) >= member.model_cfg.n_ctx or int(tokens.max()) >= member.model_cfg.d_vocab:
            raise ValueError(f"member with seed {member.seed}: position or token ids beyond n_ctx / d_vocab")


def train_stack(
    members: Sequence[Member], train_cfg: TrainConfig, progress: bool = True, shift_positions: bool = False,
    name: str | None = None,
) -> list[ToyTransformer]:
    """Train every member for ``train_cfg.steps`` steps as one stack; returns the models in eval mode.

    ``progress`` reports the steps (:class:`revlens.training.StepProgress`), under ``name`` when given.

    ``shift_positions``: add to each drawn sentence's position ids a random shift, uniform over those that
    keep its ids below ``n_ctx`` (drawn from the member's generator), so every position id is trained as
    every role (e.g. the mask's query at every id, not only at 0). Offsets within a sentence are unchanged.
    """
    if train_cfg.objective not in STACKABLE_OBJECTIVES:
        raise ValueError(f"train_stack trains the objectives {STACKABLE_OBJECTIVES}, got {train_cfg.objective!r}")
    if members and (train_cfg.objective == "arm") != (members[0].model_cfg.attention_dir == "causal"):
        raise ValueError("the next-token objective 'arm' trains a causal model (attention_dir='causal'), and only it: "
                         "a bidirectional model would see the token it predicts")
    models = [init_model(m.model_cfg, m.seed) for m in members]
    data = [m.world.training_data() for m in members]
    _check_members(members, models, data)
    if train_cfg.objective == "arm":
        for member, (_, positions) in zip(members, data):
            if not torch.equal(positions, torch.arange(positions.shape[-1]).expand_as(positions)):
                raise ValueError(f"member with seed {member.seed}: the next-token objective 'arm' needs position ids "
                                 "0, 1, 2, ... in sequence order (the token after index i is the next one); these "
                                 "sentences' ids are not (use the filler layout, layout='fillers')")
    tokens = torch.stack([t for t, _ in data])  # [instance, n, seq]
    positions = torch.stack([p for _, p in data])
    mask_id = members[0].world.mask_id
    if any(m.world.mask_id != mask_id for m in members):
        raise ValueError("stacked members' worlds must share the mask id")
    read = INPLACE_SLOT if train_cfg.objective == "inplace" else None
    template = models[0]
    if len(members) == 1:
        params = dict(template.named_parameters())
        buffers = {name: b[None] for name, b in template.named_buffers()}

        def losses(inputs: Tensor, pos: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
            logits = template(inputs[0], check_tokens=False, positions=pos[0], read=read)
            return weighted_token_loss(logits, targets[0], weights[0])[None]
    else:
        params = {name: p.requires_grad_() for name, p in stack_parameters(models).items()}
        buffers = {name: torch.stack([dict(m.named_buffers())[name] for m in models]) for name, _ in template.named_buffers()}

        def one(p: dict[str, Tensor], b: dict[str, Tensor], inputs: Tensor, pos: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
            return weighted_token_loss(functional_logits(template, {**p, **b}, inputs, pos, read), targets, weights)

        losses = partial(vmap(one), params, buffers)
    optimiser = AdamW(list(params.values()), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    generators = [torch.Generator().manual_seed(m.seed) for m in members]
    n_sentences, seq = tokens.shape[1:]
    n_ctx = members[0].model_cfg.n_ctx
    instance = torch.arange(len(members))[:, None]
    desc = f"{train_cfg.objective} stack x{len(members)}"
    for _ in StepProgress(name or desc, [m.seed for m in members], train_cfg.steps, models=len(members),
                          enabled=progress, desc=desc):
        rows, masks, rates, shifts = [], [], [], []
        for generator in generators:
            rows.append(torch.randint(n_sentences, (train_cfg.batch_size,), generator=generator))
            if shift_positions:
                room = n_ctx - positions[len(shifts), rows[-1]].amax(-1)  # shifts 0 .. room - 1 keep ids < n_ctx
                shifts.append((torch.rand(train_cfg.batch_size, generator=generator) * room).long())
            if train_cfg.objective != "arm":
                mask, rate = sample_mask(train_cfg.objective, (train_cfg.batch_size, seq), generator, train_cfg.mask_eps)
                masks.append(mask)
                rates.append(rate)
        index = torch.stack(rows)
        if train_cfg.objective == "arm":
            batch = next_token_batch(tokens[instance, index])
        else:
            batch = masked_batch(tokens[instance, index], torch.stack(masks), torch.stack(rates), mask_id)
        inputs, targets, weights = batch.inputs, batch.targets, batch.weights
        if read is not None:
            targets, weights = targets[..., read : read + 1], weights[..., read : read + 1]
        batch_positions = positions[instance, index]
        if shift_positions:
            batch_positions = batch_positions + torch.stack(shifts)[..., None]
        loss = losses(inputs, batch_positions, targets, weights)
        optimiser.step(torch.autograd.grad(loss.sum(), list(params.values())))
    if len(members) > 1:
        with torch.no_grad():
            for i, model in enumerate(models):
                for name, p in model.named_parameters():
                    p.copy_(params[name][i])
    for model in models:
        model.eval()
    return models
