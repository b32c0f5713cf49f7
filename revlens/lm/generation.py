"""Generation by denoising steps for masked diffusion LMs, with hooks, caches and patching indexed by step.

A masked diffusion LM does not answer in one forward pass: it starts from masks and, step by step,
commits some of them to tokens, each step one forward pass over the partially unmasked sequence.
This module runs that loop on a :class:`revlens.lm.HookedLM` (LLaDA or Dream family) and records
it, and lets TransformerLens hooks fire, cache and patch at chosen steps, under the same hook names
as a single forward pass.

**The generated slots** are the prompt's mask tokens (all rows need the same number of them); pass
``gen_length`` to append that many masks to the prompt instead, as LLaDA's sampler does.

**The rules**, written from the papers' descriptions of their samplers:

* *Readout.* The prediction for a slot is read at the slot itself for LLaDA (Nie et al. 2025,
  "Large Language Diffusion Models") and one position earlier for Dream (Ye et al. 2025, "Dream
  7B"), whose logits are shifted like an autoregressive model's.
* *Blocks.* With ``block_length`` B the slots are split, left to right, into blocks of B; the
  steps are shared equally between the blocks, which are unmasked one after another (LLaDA's
  semi-autoregressive sampling). Without it, all slots form one block.
* *How many tokens per step* (the schedule). ``"llada"``: each block's B slots are spread evenly
  over its k steps, ``B // k`` per step and one more in the first ``B % k`` steps (LLaDA's linear
  noise schedule gives the same expected number of unmaskings at every step). ``"dream"``: with
  times t_i = 1 - i (1 - eps) / k, step i commits ``floor(m (1 - t_{i+1} / t_i))`` of the m slots
  still masked in the block, and the last step commits all that remain (Dream's rule; it can
  commit none at a step). The default is the family's own.
* *Which token.* Greedy (``temperature=0``: the argmax) or sampled from softmax(logits / T) by the
  Gumbel-max trick. The mask token itself is never committed.
* *Which slots* (the remasking rule: the rest stay masked). ``"low_confidence"`` commits the slots
  whose chosen token has the highest probability under softmax(logits) (LLaDA's low-confidence
  remasking; Dream's ``maskgit_plus``); ``"random"`` commits random slots (LLaDA's random
  remasking); ``"margin"`` ranks by top-1 minus top-2 probability and ``"entropy"`` by negative
  entropy (Dream's ``topk_margin`` and ``entropy``). Only slots of the current block compete.

Not implemented: classifier-free guidance, top-p / top-k truncation, Dream's ``origin`` rule (a
random number of tokens per row) and its stochastic slot choice (``alg_temp``); Dream scores a
sampled token under the temperature-scaled distribution, here the plain one (the same when greedy).

**Randomness** (sampling at ``temperature > 0``, random remasking) is drawn at step s from a CPU
generator seeded with ``seed * 1_000_003 + s``: first the Gumbel uniforms, float64 of shape [batch,
n_slots, vocab], then the remasking uniforms, float64 [batch, n_slots]. The draws of a step do not
depend on earlier steps, so a run can be resumed from any step (and patched there) exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from revlens.config import MAX_SEED, check_choice, check_finite, check_int
from revlens.patching import auto_sites_per_pass, site_patch_hooks

REMASKING: tuple[str, ...] = ("low_confidence", "random", "margin", "entropy")
SCHEDULES: tuple[str, ...] = ("llada", "dream")
StepSpec = None | int | Iterable[int] | Callable[[int], bool]  # None = every step
HookFn = Callable[[Tensor, Any], Tensor | None]
_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class GenerationConfig:
    """How to denoise: steps, blocks, schedule, remasking rule, temperature and seed."""

    steps: int
    block_length: int | None = None  # None: one block holding every slot
    remasking: str = "low_confidence"
    temperature: float = 0.0
    schedule: str = "llada"
    eps: float = 1e-3  # the "dream" schedule's final time
    seed: int = 0


@dataclass(frozen=True)
class PlannedStep:
    block: int
    first_slot: int  # the block's slots are [first_slot, end_slot)
    end_slot: int
    n_commit: int


def plan_steps(n_slots: int, config: GenerationConfig) -> list[PlannedStep]:
    """Per step: its block and how many slots it commits. Refuses impossible settings with the reason."""
    if type(config.steps) is not int:  # its range is checked against the generation length below
        raise ValueError(f"steps must be an integer, got {config.steps!r}")
    if config.block_length is not None:
        check_int("block_length", config.block_length, 1)
    check_int("seed", config.seed, 0, MAX_SEED)
    # an infinite temperature would sample uniformly over the vocabulary (the mask token included), NaN would
    # silently run as greedy: both are refused, as is a negative one
    t = config.temperature
    if not (isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t >= 0):
        raise ValueError(f"temperature={t!r} must be >= 0 and finite (0 = greedy)")
    check_finite("eps", config.eps)
    check_choice("remasking", config.remasking, REMASKING)
    check_choice("schedule", config.schedule, SCHEDULES)
    block = n_slots if config.block_length is None else config.block_length
    if not 1 <= block <= n_slots or n_slots % block:
        raise ValueError(f"block_length={config.block_length} does not divide the generation length {n_slots} "
                         f"(the number of masked slots)")
    n_blocks = n_slots // block
    if not 1 <= config.steps <= n_slots:
        raise ValueError(f"steps={config.steps} is out of range: need 1 <= steps <= {n_slots} (the generation length)")
    if config.steps % n_blocks:
        raise ValueError(f"steps={config.steps} is not a multiple of the number of blocks {n_blocks} "
                         f"(generation length {n_slots} / block_length {block})")
    if not 0 < config.eps < 1:
        raise ValueError(f"eps={config.eps} must lie in (0, 1)")
    per_block = config.steps // n_blocks
    plan = []
    for b in range(n_blocks):
        if config.schedule == "llada":
            counts = [block // per_block + (i < block % per_block) for i in range(per_block)]
        else:
            times = [1 - i * (1 - config.eps) / per_block for i in range(per_block + 1)]
            counts, left = [], block
            for i in range(per_block):
                n = left if i == per_block - 1 else int(left * (1 - times[i + 1] / times[i]))
                counts.append(n)
                left -= n
        plan += [PlannedStep(b, b * block, (b + 1) * block, n) for n in counts]
    return plan


@dataclass(frozen=True)
class StepRecord:
    """What one step committed, per row, in the order chosen (most confident first)."""

    step: int
    block: int
    slots: Int[Tensor, "batch k"]  # index into the generated slots
    positions: Int[Tensor, "batch k"]  # position in the sequence
    tokens: Int[Tensor, "batch k"]
    confidence: Float[Tensor, "batch k"]  # the remasking rule's score (probability for low_confidence)
    probability: Float[Tensor, "batch k"]  # softmax(logits) of the committed token


class StepCache:
    """Activations cached at chosen steps: ``cache[step][name]`` is what ``run_with_cache`` would hold.

    One step costs, per name, batch x the activation's size x the element size (float32: 4 bytes):
    ``hook_pattern`` batch x heads x seq^2, ``hook_resid_pre`` batch x seq x d_model, ...;
    :attr:`nbytes_per_step` reports it.
    """

    def __init__(self, n_steps: int | None = None) -> None:
        self.data: dict[int, dict[str, Tensor]] = {}
        self.n_steps = n_steps  # the steps of the run it was cached from (checked by patch_generation)

    def __getitem__(self, step: int) -> dict[str, Tensor]:
        if step not in self.data:
            raise KeyError(f"step {step} was not cached (cached steps: {self.steps})")
        return self.data[step]

    @property
    def steps(self) -> list[int]:
        return sorted(self.data)

    @property
    def nbytes_per_step(self) -> dict[int, int]:
        return {s: sum(t.numel() * t.element_size() for t in acts.values()) for s, acts in self.data.items()}

    def stack(self, name: str) -> Tensor:
        """``name`` at every cached step, stacked: [n_cached_steps, *activation shape]."""
        return torch.stack([self[s][name] for s in self.steps])


@dataclass
class GenerationTrace:
    """A denoising run: the state before every step, and what each step committed."""

    config: GenerationConfig
    slots: Int[Tensor, "batch n_slots"]  # positions of the generated slots
    states: Int[Tensor, "n_steps_plus_1 batch pos"]  # states[s]: the sequence before step s; [-1]: final
    records: list[StepRecord]
    targets: Int[Tensor, "batch n_slots"] | None = None
    target_logprob: Float[Tensor, "n_steps batch n_slots"] | None = None  # log p(target) at each step
    cache: StepCache = field(default_factory=StepCache)

    @property
    def n_steps(self) -> int:
        return len(self.records)

    @property
    def answer(self) -> Int[Tensor, "batch n_slots"]:
        return self.states[-1].gather(1, self.slots)

    @property
    def commit_step(self) -> Int[Tensor, "batch n_slots"]:
        """The step at which each slot was committed (the unmasking order)."""
        out = torch.full_like(self.slots, -1)
        for r in self.records:
            out.scatter_(1, r.slots, r.step)
        return out


def _step_set(spec: StepSpec, n_steps: int, what: str) -> frozenset[int]:
    if spec is None:
        return frozenset(range(n_steps))
    if callable(spec):
        return frozenset(s for s in range(n_steps) if spec(s))
    steps = frozenset([spec] if isinstance(spec, int) else spec)
    bad = sorted(s for s in steps if not isinstance(s, int) or not 0 <= s < n_steps)
    if bad:
        raise ValueError(f"{what} {bad} outside the generation's steps 0..{n_steps - 1}")
    return steps


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * _SEED_STRIDE + step)


def _scores(slot_logits: Float[Tensor, "rows n_slots vocab"], config: GenerationConfig, step: int, copies: int
            ) -> tuple[Tensor, Tensor, Tensor]:
    """Chosen token, its probability and the remasking score of every slot (randomness tiled over copies)."""
    rows, n_slots, vocab = slot_logits.shape
    batch = rows // copies
    gen = _step_generator(config.seed, step) if config.temperature > 0 or config.remasking == "random" else None
    probs = slot_logits.softmax(-1)
    if config.temperature > 0:
        uniform = torch.rand((batch, n_slots, vocab), generator=gen, dtype=torch.float64).to(slot_logits.device)
        gumbel = -torch.log(-torch.log(uniform))
        tokens = (slot_logits.double() / config.temperature + gumbel.repeat(copies, 1, 1)).argmax(-1)
    else:
        tokens = slot_logits.argmax(-1)
    chosen = probs.gather(-1, tokens[..., None]).squeeze(-1)
    if config.remasking == "low_confidence":
        score = chosen.double()
    elif config.remasking == "random":
        score = torch.rand((batch, n_slots), generator=gen, dtype=torch.float64).to(slot_logits.device).repeat(copies, 1)
    elif config.remasking == "margin":
        top2 = probs.topk(2, dim=-1).values
        score = (top2[..., 0] - top2[..., 1]).double()
    else:  # entropy: the more peaked, the more confident
        score = (probs * slot_logits.log_softmax(-1)).nan_to_num().sum(-1).double()
    return tokens, chosen, score


@torch.no_grad()
def _denoise(lm: Any, trace: GenerationTrace, start: int, hooks_at: Callable[[int], list[tuple[str, HookFn]]],
             copies: int = 1, progress: bool = False) -> GenerationTrace:
    """Run steps ``start ..`` of ``trace``'s plan on ``copies`` tiled copies of its batch; earlier steps are copied."""
    config = trace.config
    plan = plan_steps(trace.slots.shape[1], config)
    slots = trace.slots.repeat(copies, 1)
    read_at = lm.read_position(slots)
    state = trace.states[start].repeat(copies, 1)
    is_open = trace.commit_step.repeat(copies, 1) >= start if start else torch.ones_like(slots, dtype=torch.bool)
    targets = None if trace.targets is None else trace.targets.repeat(copies, 1)
    slot_ids = torch.arange(slots.shape[1], device=slots.device)
    states = [s.repeat(copies, 1) for s in trace.states[: start + 1]]
    records = [replace(r, **{k: getattr(r, k).repeat(copies, 1) for k in ("slots", "positions", "tokens", "confidence",
                                                                             "probability")}) for r in trace.records[:start]]
    target_logprob = [] if targets is None or not start else list(trace.target_logprob[:start].repeat(1, copies, 1))
    for step in tqdm(range(start, len(plan)), desc="denoising", disable=not progress):
        planned = plan[step]
        hooks = hooks_at(step)
        logits = lm.bridge.run_with_hooks(state, fwd_hooks=hooks) if hooks else lm.bridge(state)
        slot_logits = logits.gather(1, read_at[..., None].expand(-1, -1, logits.shape[-1])).float()
        slot_logits[..., int(lm.mask_token_id)] = float("-inf")
        if targets is not None:
            target_logprob.append(slot_logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1))
        tokens, chosen, score = _scores(slot_logits, config, step, copies)
        eligible = is_open & (slot_ids >= planned.first_slot) & (slot_ids < planned.end_slot)
        top = score.masked_fill(~eligible, float("-inf")).topk(planned.n_commit, dim=-1)
        picked = top.indices
        positions = slots.gather(1, picked)
        committed = tokens.gather(1, picked)
        state = state.scatter(1, positions, committed)
        is_open = is_open.scatter(1, picked, False)
        states.append(state)
        records.append(StepRecord(step, planned.block, picked, positions, committed, top.values.float(),
                                  chosen.gather(1, picked)))
    return GenerationTrace(config, slots, torch.stack(states), records, targets,
                           None if targets is None else torch.stack(target_logprob))


def _masked_prompt(lm: Any, tokens: Tensor, gen_length: int | None) -> tuple[Tensor, Tensor]:
    """The prompt with its generated slots (``gen_length`` masks appended, or its own masks), checked."""
    if not lm.family.masked:
        raise ValueError(f"{lm.family.name} is a left-to-right model with no mask token: it has no denoising steps")
    from revlens.readout import mask_positions

    tokens = lm._check_tokens(tokens)
    mask_id = int(lm.mask_token_id)
    if gen_length is not None:
        check_int("gen_length", gen_length, 1)
        if (tokens == mask_id).any():
            row = int((tokens == mask_id).any(1).nonzero()[0])
            raise ValueError(f"prompt {row} already holds mask tokens (id {mask_id}) and gen_length={gen_length} would "
                             "append more: generate either the prompt's own masks (no gen_length) or appended ones")
        tokens = torch.cat([tokens, torch.full((tokens.shape[0], gen_length), mask_id, device=tokens.device)], 1)
    elif not (tokens == mask_id).any(1).all():
        row = int((~(tokens == mask_id).any(1)).nonzero()[0])
        raise ValueError(f"prompt {row} has no mask token (id {mask_id}) to generate: put masks where the answer "
                         f"goes, or pass gen_length to append masks")
    return tokens, mask_positions(tokens, mask_id, readout=lm.family.readout, causal=False)


def generate(
    lm: Any,
    tokens: Int[Tensor, "batch pos"],
    steps: int,
    *,
    gen_length: int | None = None,
    block_length: int | None = None,
    remasking: str = "low_confidence",
    temperature: float = 0.0,
    schedule: str | None = None,
    eps: float = 1e-3,
    seed: int = 0,
    fwd_hooks: Sequence[tuple] = (),
    hook_steps: StepSpec = None,
    cache_names: Sequence[str] | None = None,
    cache_steps: StepSpec = None,
    targets: Int[Tensor, "batch n_slots"] | None = None,
    progress: bool = False,
) -> GenerationTrace:
    """Denoise every row's masks in ``steps`` steps, one batched forward pass per step (rules: module docstring).

    ``fwd_hooks``: ``(name, fn)`` pairs, TransformerLens-style ``fn(activation, hook)``, firing at
    ``hook_steps`` (None = every step; a step, a list of steps, or a predicate on the step), or
    ``(name, fn, steps)`` with their own steps. ``cache_names`` (a names filter, required for caching,
    as for ``run_with_cache``) are cached at ``cache_steps`` into ``trace.cache`` (after the hooks'
    edits). ``targets`` (one token per slot) records log p(target) at every step. At steps without
    hooks or caching the model runs without any hook.
    """
    tokens, slots = _masked_prompt(lm, tokens, gen_length)
    config = GenerationConfig(steps, block_length, remasking, temperature, schedule or lm.family.name, eps, seed)
    plan_steps(slots.shape[1], config)  # refuse bad settings before any forward pass
    if targets is not None and tuple(targets.shape) != tuple(slots.shape):
        raise ValueError(f"targets must hold one token per slot, shape {tuple(slots.shape)}; got {tuple(targets.shape)}")
    user_hooks = []
    for entry in fwd_hooks:
        if len(entry) not in (2, 3):
            raise ValueError(f"a hook is (name, fn) or (name, fn, steps), got {entry!r}")
        name, fn, spec = (*entry, hook_steps) if len(entry) == 2 else entry
        user_hooks.append((lm.check_hook_names([name])[0], fn, _step_set(spec, steps, "hook steps")))
    cache = StepCache(steps)
    if cache_names is not None:
        cache_names = lm.check_hook_names([cache_names] if isinstance(cache_names, str) else cache_names)
        if not cache_names:
            raise ValueError("cache_names is empty: name the hooks to cache (a full cache of a large model does not fit)")
        cached_steps = _step_set(cache_steps, steps, "cache steps")
    elif cache_steps is not None:
        raise ValueError("cache_steps needs cache_names (the hooks to cache)")

    def hooks_at(step: int) -> list[tuple[str, HookFn]]:
        hooks = [(name, fn) for name, fn, at in user_hooks if step in at]
        if cache_names and step in cached_steps:
            store = cache.data.setdefault(step, {})

            def saver(name: str) -> HookFn:  # keyed by the name asked for (TransformerLens aliases some names)
                def save(activation: Tensor, hook: Any) -> None:
                    store[name] = activation.detach().clone()

                return save

            hooks += [(name, saver(name)) for name in cache_names]
        return hooks

    start = GenerationTrace(config, slots, tokens[None], [],
                            None if targets is None else targets.to(tokens.device))
    trace = _denoise(lm, start, 0, hooks_at, progress=progress)
    trace.cache = cache
    return trace


@dataclass(frozen=True)
class PatchedGeneration:
    """Patched reruns, one per site: ``answer[site, row]``, ``commit_step[site, row]``, ``target_logprob``."""

    steps: tuple[int, ...]
    sites: list[tuple[int, tuple]]
    answer: Int[Tensor, "site batch n_slots"]
    commit_step: Int[Tensor, "site batch n_slots"]
    target_logprob: Float[Tensor, "site n_steps batch n_slots"] | None


@torch.no_grad()
def patch_generation(
    lm: Any,
    corrupted: GenerationTrace,
    clean_cache: StepCache,
    hook: str,
    sites: list[tuple[int, tuple]],
    steps: int | Iterable[int],
    *,
    sites_per_pass: int | None = None,
    progress: bool = False,
) -> PatchedGeneration:
    """Rerun ``corrupted`` with one site at a time patched, at ``steps``, from the clean run at the same step.

    ``hook`` is a template such as ``revlens.patching.RESID_PRE``; a site is ``(layer, index)`` as in
    :func:`revlens.patching.batched_patch`; ``clean_cache[s]`` must hold the clean activations of the
    same batch at each patched step s. Steps before the first patched one are identical in every
    rerun, so they are not recomputed: each rerun starts from the corrupted state before that step
    (the batch repeated once per site, all sites of a pass in one forward per step; how many sites
    share a pass follows :func:`revlens.patching.auto_sites_per_pass` unless ``sites_per_pass`` is
    given). The corrupted run's own hooks are not re-applied.
    """
    steps = tuple(sorted(_step_set(steps, corrupted.n_steps, "patched steps")))
    if not steps:
        raise ValueError("no step to patch")
    if clean_cache.n_steps not in (None, corrupted.n_steps):
        raise ValueError(f"the clean cache comes from a run of {clean_cache.n_steps} steps, the corrupted run has "
                         f"{corrupted.n_steps}: step s would patch another point of the schedule; generate both alike")
    if sites_per_pass is not None:
        check_int("sites_per_pass", sites_per_pass, 1)
    n_layers = lm.cfg.n_layers
    for site in sites:
        if not (isinstance(site, tuple) and len(site) == 2 and type(site[0]) is int and 0 <= site[0] < n_layers
                and isinstance(site[1], tuple)):
            raise ValueError(f"a site is (layer, index) with layer in 0..{n_layers - 1} and index a tuple, got {site!r}")
    needed = sorted({hook.format(layer=layer) for layer, _ in sites})
    n, seq = corrupted.slots.shape[0], corrupted.states.shape[-1]
    for s in steps:
        missing = [name for name in needed if name not in clean_cache[s]]
        if missing:
            raise KeyError(f"the clean cache at step {s} lacks {missing}: generate the clean run with them in cache_names")
        for name in needed:
            shape = tuple(clean_cache[s][name].shape[:2])
            if shape != (n, seq) and not (name.endswith(("hook_pattern", "hook_attn_scores")) and shape[0] == n):
                raise ValueError(f"the clean cache's {name} at step {s} holds [batch, seq] = {list(shape)}, the corrupted "
                                 f"run [{n}, {seq}]: patch from a clean run of the same batch and prompt length")
    per_pass = sites_per_pass or auto_sites_per_pass(lm, n, corrupted.states.shape[-1])
    answers, commits, logps = [], [], []
    for first in tqdm(range(0, len(sites), per_pass), desc="patching", disable=not progress):
        chunk = sites[first : first + per_pass]
        hooks = {s: site_patch_hooks(hook, clean_cache[s], chunk, n) for s in steps}
        rerun = _denoise(lm, corrupted, steps[0], lambda s: hooks.get(s, []), copies=len(chunk))
        answers.append(rerun.answer.reshape(len(chunk), n, -1))
        commits.append(rerun.commit_step.reshape(len(chunk), n, -1))
        if rerun.target_logprob is not None:
            logps.append(rerun.target_logprob.reshape(rerun.n_steps, len(chunk), n, -1).transpose(0, 1))
    return PatchedGeneration(steps, list(sites), torch.cat(answers), torch.cat(commits),
                             torch.cat(logps) if logps else None)
