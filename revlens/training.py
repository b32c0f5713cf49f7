"""One training loop for every objective, training several seeds of one architecture at once.

The K model instances (one per seed) share shapes, so their parameters are stacked along a new
leading axis and one ``torch.func.vmap`` of the forward pass gives all K losses in a single call.
The instances share no parameters, so ordinary autograd on the *sum* of the K losses gives each
instance exactly its own gradient (the sum's derivative with respect to each loss is 1.0), without
``vmap``'s per-operation overhead in the backward pass. AdamW (:mod:`revlens.optim`: torch's
bits, faster) is element-wise, so stepping the stacked tensors equals stepping each model alone.
Each instance draws its own batches and masks from its own seeded generator
(:func:`revlens.objectives.sample_loss_batches`), so instance k of a K-seed run sees exactly the
data of a 1-seed run with the same seed. A single seed is trained as a plain module (no stacking,
no ``vmap``): that is what training one model alone means, and what the batched path is measured
against in ``bench/batched_training.py``; the two paths give bit-identical weights (tested).

Every ``log_every`` steps the loop evaluates each instance (stacked instances in one vmapped pass,
:func:`revlens.evaluation.evaluate_instances`) and calls the callbacks, whose returned
dictionaries are merged into that instance's history row -- the hook later notebooks use to record
gradient alignment or route weights without copying this loop.

Progress (:class:`StepProgress`) is a tqdm bar on stderr, or, when ``$REVLENS_PROGRESS_FILE`` names a
file, JSON lines appended to it: ``revlens reproduce`` sets that for the notebook kernels it starts and
draws the notebooks' training on its own console, so no bar lands in a cell's output.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from torch.func import vmap
from tqdm import tqdm

from revlens.config import EncoderConfig, check_choice, check_fields, check_finite
from revlens.evaluation import evaluate, evaluate_instances
from revlens.model import ToyTransformer, functional_logits, stack_parameters
from revlens.objectives import (
    MDM_MASK_EPS,
    OBJECTIVES,
    Objective,
    check_mask_eps,
    sample_loss_batches,
    weighted_token_loss,
)
from revlens.optim import AdamW
from revlens.world import ReversalWorld

Callback = Callable[[int, ToyTransformer], dict[str, float]]
"""Called as ``callback(step, model)`` (model in eval mode, current weights); returns values to log."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; ``objective`` picks the loss (see :mod:`revlens.objectives`)."""

    objective: Objective = "mdm"
    steps: int = 2000
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.01
    log_every: int = 100
    mask_eps: float = MDM_MASK_EPS
    """Floor of the ``mdm`` masking probability, p = (1 - eps) t + eps (LLaDA's 1e-3; 0 gives p = t)."""

    def __post_init__(self) -> None:
        check_choice("objective", self.objective, OBJECTIVES)
        check_mask_eps(self.mask_eps)
        for name in ("steps", "batch_size", "log_every"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:  # a bool is not a step count
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        check_finite("lr", self.lr, 0, strict=True)
        check_finite("weight_decay", self.weight_decay, 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """The settings a JSON object names; an unknown or wrong-typed field is an error naming it."""
        return cls(**check_fields(cls, data))


@dataclass
class TrainRun:
    """A trained model with its seed, its settings and its logged history."""

    model: ToyTransformer
    seed: int
    train_cfg: TrainConfig
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, float]:
        """The last evaluation (taken at the final step)."""
        return {k: v for k, v in self.history[-1].items() if k not in ("step", "loss")}


INIT_NOISE_ENV = "REVLENS_INIT_NOISE"
"""Environment variable: relative size of a multiplicative perturbation of every initial weight."""


def init_noise() -> float:
    """The relative initial-weight perturbation asked for in ``$REVLENS_INIT_NOISE`` (0 when unset).

    Other CPUs, BLAS builds and thread counts train slightly different float32 models from the same
    seed. Setting e.g. ``REVLENS_INIT_NOISE=1e-7`` (float32 rounding level) multiplies every initial
    weight by ``1 + 1e-7 * N(0, 1)``, which imitates that drift on one machine: a printed number that
    such a perturbation moves is not reproducible across machines. It is part of the run-cache key.
    """
    raw = os.environ.get(INIT_NOISE_ENV, "").strip()
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{INIT_NOISE_ENV} must be a number, got {raw!r}") from None
    if not 0.0 <= value <= 1e-3:
        raise ValueError(f"{INIT_NOISE_ENV} must lie in [0, 1e-3] (a rounding-level perturbation), got {raw!r}")
    return value


PROGRESS_ENV = "REVLENS_PROGRESS_FILE"
"""Environment variable: a file that training appends JSON progress lines to instead of drawing a bar."""

_run_numbers = itertools.count()


def progress_file() -> Path | None:
    """The file named by ``$REVLENS_PROGRESS_FILE``, or None (unset or empty: progress bars on stderr)."""
    value = os.environ.get(PROGRESS_ENV, "")
    return Path(value) if value else None


class StepProgress:
    """Reports the steps of one training run: a tqdm bar on stderr, or JSON lines when :func:`progress_file` is set.

    Iterating yields the steps ``1 .. steps``; a step counts as done when the loop body for it returns.
    With a progress file there is no bar, and each line is one object with ``run`` (unique to this
    run), ``setting``, ``seeds``, ``models`` (how many models train together), ``step``, ``steps``,
    ``done``, ``cached`` and ``time`` (seconds since the epoch): one at step 0, then at most one every
    ``interval`` seconds, and one with ``done`` true after the last step; a run that stops with an
    error writes no ``done`` line. ``cached`` marks a run served from the run cache: it writes its
    ``done`` line at once (``cached`` true), draws no bar and is not iterated. ``enabled=False``
    reports nothing anywhere.
    """

    def __init__(self, setting: str, seeds: Sequence[int], steps: int, *, models: int | None = None,
                 enabled: bool = True, desc: str | None = None, cached: bool = False, interval: float = 0.5) -> None:
        self.path = progress_file() if enabled else None
        self.steps, self.interval = steps, interval
        self._fields = {"run": f"{os.getpid()}-{next(_run_numbers)}", "setting": setting,
                        "seeds": [int(s) for s in seeds], "models": len(seeds) if models is None else models,
                        "steps": steps}
        self._bar = tqdm(total=steps, desc=desc or setting, mininterval=2.0,
                         disable=not enabled or cached or self.path is not None)
        self._next_write = 0.0
        if self.path is not None:
            self._write(steps if cached else 0, done=cached, cached=cached)

    def __iter__(self) -> Iterator[int]:
        for step in range(1, self.steps + 1):
            yield step
            self._bar.update(1)
            if self.path is not None and step < self.steps and time.monotonic() >= self._next_write:
                self._write(step)
        self._bar.close()
        if self.path is not None:
            self._write(self.steps, done=True)

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the bar (the loss, say); a progress file does not record them."""
        self._bar.set_postfix(**values)

    def _write(self, step: int, done: bool = False, cached: bool = False) -> None:
        assert self.path is not None
        line = json.dumps({**self._fields, "step": step, "done": done, "cached": cached, "time": time.time()})
        with open(self.path, "a", encoding="utf-8") as f:  # one short append: several processes' lines never interleave
            f.write(line + "\n")
        self._next_write = time.monotonic() + self.interval


def init_model(cfg: EncoderConfig, seed: int) -> ToyTransformer:
    """A freshly initialised model whose weights depend only on ``cfg`` and ``seed``
    (and on :func:`init_noise`, when that switch is set)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ToyTransformer(cfg)
    noise = init_noise()
    if noise:
        generator = torch.Generator().manual_seed(10_007 + seed)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.0 + noise * torch.randn(p.shape, generator=generator))
    return model


LossBatchFn = Callable[[Tensor, Tensor, Tensor], Float[Tensor, " instance"]]


def _loss_function(models: Sequence[ToyTransformer]) -> tuple[dict[str, Tensor], LossBatchFn]:
    """The parameters to optimise and ``losses(inputs, targets, weights)``, all ``[instance, ...]``.

    One model: its own parameters, called as a plain module. Several: their parameters stacked along
    a new leading axis, and the first model's forward ``vmap``-ed over that axis.
    """
    if len(models) == 1:
        (model,) = models

        def single(inputs: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
            return weighted_token_loss(model(inputs[0], check_tokens=False), targets[0], weights[0])[None]

        return dict(model.named_parameters()), single
    template = models[0]
    params = {name: p.requires_grad_() for name, p in stack_parameters(models).items()}

    def one_instance(p: dict[str, Tensor], inputs: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
        return weighted_token_loss(functional_logits(template, p, inputs), targets, weights)

    return params, partial(vmap(one_instance), params)


def train(
    model_cfg: EncoderConfig,
    world: ReversalWorld,
    train_cfg: TrainConfig,
    seeds: Sequence[int] = (0,),
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    name: str | None = None,
) -> list[TrainRun]:
    """Train one model per seed on ``world``'s training sentences; returns them in seed order.

    ``progress`` reports the steps (:class:`StepProgress`), under ``name`` (e.g. the setting's) when
    given. A non-finite loss stops training with a ValueError (step and seeds named) instead of
    training on NaNs.
    """
    if model_cfg.d_vocab != world.d_vocab:
        raise ValueError(f"model d_vocab={model_cfg.d_vocab} does not match the world's {world.d_vocab}")
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"seeds must be distinct and non-empty, got {list(seeds)}")
    sentences = world.training_sentences()
    if sentences.max() >= model_cfg.d_vocab:
        raise ValueError("training sentences contain token ids outside the model's vocabulary")
    if sentences.shape[1] > model_cfg.n_ctx:
        raise ValueError(f"sentences of length {sentences.shape[1]} exceed n_ctx={model_cfg.n_ctx}")

    runs = [TrainRun(init_model(model_cfg, s), s, train_cfg) for s in seeds]
    params, batch_losses = _loss_function([run.model for run in runs])
    optimiser = AdamW(list(params.values()), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    stacked = len(runs) > 1

    def copy_stacked_into_models() -> None:
        with torch.no_grad():
            for i, run in enumerate(runs):
                for name, p in run.model.named_parameters():
                    p.copy_(params[name][i])

    def log(step: int, losses: torch.Tensor) -> None:
        if stacked:
            metrics = evaluate_instances(runs[0].model, params, world, train_cfg.objective)
            if callbacks:
                copy_stacked_into_models()
        else:
            metrics = [evaluate(runs[0].model, world, train_cfg.objective)]
        for run, loss, run_metrics in zip(runs, losses, metrics):
            run.model.eval()
            row = {"step": step, "loss": float(loss), **run_metrics}
            for callback in callbacks:
                row.update(callback(step, run.model))
            run.history.append(row)

    log(0, torch.full((len(runs),), float("nan")))
    desc = f"{train_cfg.objective} x{len(seeds)}"
    bar = StepProgress(name or desc, seeds, train_cfg.steps, enabled=progress, desc=desc)
    for step in bar:
        batch = sample_loss_batches(
            train_cfg.objective, sentences, train_cfg.batch_size, world.mask_id, generators, train_cfg.mask_eps
        )
        losses = batch_losses(batch.inputs, batch.targets, batch.weights)
        if not torch.isfinite(losses).all():
            bad = [seed for seed, ok in zip(seeds, torch.isfinite(losses).tolist()) if not ok]
            raise ValueError(f"training diverged: the loss is {losses.tolist()} at step {step} (seeds {bad}); "
                             f"lower the learning rate (lr={train_cfg.lr})")
        optimiser.step(torch.autograd.grad(losses.sum(), list(params.values())))
        if step % train_cfg.log_every == 0 or step == train_cfg.steps:
            log(step, losses.detach())
            bar.set_postfix(loss=f"{losses.mean():.3f}")
    if stacked:
        copy_stacked_into_models()
    for run in runs:
        run.model.eval()
    return runs
