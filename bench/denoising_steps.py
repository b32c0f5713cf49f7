"""Benchmark: step-by-step generation and step-indexed hooks on the shipped small MDM, in one run.

1. Hook overhead. Baseline: the bare forward passes generation needs (one per step, whole batch).
   Against it: generation without hooks, with one cached hook point at one step, and with that hook
   at every step. Steps without hooks run the model without any hook, so generation without hooks
   should cost the forward passes plus the sampler's bookkeeping.
2. Patching at step k. Baseline: every site's rerun from step 0 with the patch hook at step k (all
   sites batched, the public ``generate`` with step-indexed hooks). Against it:
   ``patch_generation``, which starts each rerun from the stored state before step k. Both give the
   same answers (checked); the expected saving is k of the ``steps`` forward passes.

    python bench/denoising_steps.py
"""

from __future__ import annotations

import os

import torch
from _timing import best_of

from revlens.facts import FactSet
from revlens.lm import HookedLM
from revlens.lm.generation import generate, patch_generation
from revlens.lm.small_pair import SMALL_PAIR_DIR
from revlens.patching import RESID_PRE, resid_pre_sites, site_patch_hooks

STEPS, GEN_LENGTH, BATCH = 8, 8, 16


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    lm = HookedLM.from_pretrained(SMALL_PAIR_DIR / "llada")
    world = FactSet.load(SMALL_PAIR_DIR / "world.json")
    prompts = [lm.encode(world.facts[i].a + " wrote", special_tokens=True) for i in range(len(world.facts))]
    shape = len(prompts[0])
    prompts = torch.tensor([p for p in prompts if len(p) == shape][: 2 * BATCH])
    clean_x, corrupted_x = prompts[:BATCH], prompts[BATCH:]
    print(f"{lm}; {BATCH} prompts of {shape} tokens + {GEN_LENGTH} masks, {STEPS} steps, 1 thread")

    masked = torch.cat([clean_x, torch.full((BATCH, GEN_LENGTH), lm.mask_token_id)], 1)
    hook = "blocks.1.attn.hook_pattern"
    runs = {
        "forward passes only": lambda: [lm.bridge(masked) for _ in range(STEPS)],
        "generate, no hooks": lambda: generate(lm, clean_x, STEPS, gen_length=GEN_LENGTH),
        "generate, cache 1 hook at step 3": lambda: generate(lm, clean_x, STEPS, gen_length=GEN_LENGTH,
                                                             cache_names=[hook], cache_steps=[3]),
        "generate, cache 1 hook every step": lambda: generate(lm, clean_x, STEPS, gen_length=GEN_LENGTH, cache_names=[hook]),
    }
    times = {label: best_of(fn, 15)[0] for label, fn in runs.items()}
    base = times["forward passes only"]
    print(f"\n{'run':36s} {'best ms':>8s} {'/ forward passes':>17s}")
    for label, t in times.items():
        print(f"{label:36s} {t * 1e3:8.1f} {t / base:16.2f}x")

    names = [RESID_PRE.format(layer=l) for l in range(lm.cfg.n_layers)]
    clean = generate(lm, clean_x, STEPS, gen_length=GEN_LENGTH, cache_names=names)
    corrupted = generate(lm, corrupted_x, STEPS, gen_length=GEN_LENGTH)
    sites = resid_pre_sites(lm.cfg.n_layers, clean.states.shape[-1])
    print(f"\npatching {len(sites)} resid_pre sites x {BATCH} prompts at step k (all sites in one batch)")
    print(f"{'k':>3s} {'rerun from 0 ms':>16s} {'from k ms':>10s} {'speed-up':>9s} {'expected':>9s} {'same answers':>13s}")
    for k in (0, 4, 7):
        def from_zero(k=k):
            hooks = site_patch_hooks(RESID_PRE, clean.cache[k], sites, BATCH)
            return generate(lm, corrupted_x.repeat(len(sites), 1), STEPS, gen_length=GEN_LENGTH,
                            fwd_hooks=[(name, fn, [k]) for name, fn in hooks])

        def from_k(k=k):
            return patch_generation(lm, corrupted, clean.cache, RESID_PRE, sites, k)

        same = torch.equal(from_zero().answer.reshape(len(sites), BATCH, -1), from_k().answer)
        (t0, _), (tk, _) = best_of(from_zero, 5), best_of(from_k, 5)
        print(f"{k:>3d} {t0 * 1e3:16.1f} {tk * 1e3:10.1f} {t0 / tk:8.2f}x {STEPS / (STEPS - k):8.2f}x {str(same):>13s}")


if __name__ == "__main__":
    main()
