"""Benchmark: batched activation patching vs ``transformer_lens.patching``, same pairs, same run.

Both sweep every (layer, position) of the residual stream (``get_act_patch_resid_pre``) on the same
reverse-query pairs of the shipped small MDM (4 layers, d_model 128) and of a wider LLaDA-shaped
random model (8 layers, d_model 512, d_mlp 1536) for 1, 4, 16, 91 and 256 pairs (past the 91
forward-only pairs the pairs repeat). The script prints, per size, both times, the speed-up and the
largest absolute difference of the results (target: speed-up >= 1 at every size, differences < 1e-5).
TransformerLens runs one full pass per site; ``revlens.patching`` skips sites that patch nothing,
runs the layers before the first patched one once, and sizes its passes from the batch
(:func:`revlens.patching.auto_sites_per_pass`).

    python bench/batched_patching.py            # about 5 minutes on 2 cores
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os

import torch
import transformer_lens.patching as tl_patching
from _timing import best_of

from revlens.config import load_json
from revlens.facts import FactSet
from revlens.lm import HookedLM
from revlens.lm.analysis import PatchingPairs, answer_logprob_metric, patching_pairs
from revlens.lm.families import build_module
from revlens.lm.small_pair import SMALL_PAIR_DIR
from revlens.patching import auto_sites_per_pass, patch_names, patch_resid_pre

SIZES = (1, 4, 16, 91, 256)
WIDE = {"d_model": 512, "n_heads": 8, "n_kv_heads": 8, "n_layers": 8, "mlp_hidden_size": 1536}


def wide_model(small: HookedLM) -> HookedLM:
    """A randomly initialised LLaDA-shaped model with the small pair's tokenizer and mask token."""
    raw = {**load_json(SMALL_PAIR_DIR / "llada" / "config.json"), **WIDE}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module, hf_config = build_module(small.family, raw, meta=False)
    return HookedLM.from_module(module, hf_config, small.family, tokenizer=small.tokenizer,
                                mask_token_id=small.mask_token_id, source="random, LLaDA-shaped")


def first_pairs(pairs: PatchingPairs, n: int) -> PatchingPairs:
    """The first ``n`` pairs, repeating them cyclically past the end."""
    rows = torch.arange(n) % len(pairs.facts)
    return dataclasses.replace(pairs, clean=pairs.clean[rows], corrupted=pairs.corrupted[rows],
                               answer=pairs.answer[rows], facts=[pairs.facts[i] for i in rows.tolist()])


def bench(lm: HookedLM, all_pairs: PatchingPairs) -> None:
    print(f"\nresid_pre patching on {lm}")
    print(f"{'pairs':>6} {'sites':>6} {'per pass':>9} {'TL best ms':>11} {'revlens best ms':>16} {'speed-up':>9} {'max |diff|':>11}")
    for n_pairs in SIZES:
        pairs = first_pairs(all_pairs, n_pairs)
        metric = answer_logprob_metric(pairs)
        _, cache = lm.run_with_cache(pairs.clean, patch_names(lm, "resid_pre"))

        def baseline():
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # TL's per-site progress bar
                return tl_patching.get_act_patch_resid_pre(lm.bridge, pairs.corrupted, cache, metric)

        def batched():
            return patch_resid_pre(lm, pairs.corrupted, cache, metric)

        max_diff = (baseline() - batched()).abs().max().item()  # also the warm-up of both
        repeats = 5 if n_pairs * lm.cfg.d_model <= 16 * 512 else 2
        (t_tl, _), (t_ours, _) = best_of(baseline, repeats, warm_up=False), best_of(batched, repeats, warm_up=False)
        seq = pairs.clean.shape[1]
        per_pass = auto_sites_per_pass(lm, n_pairs, seq)
        print(f"{n_pairs:>6} {lm.cfg.n_layers * seq:>6} {per_pass:>9} {t_tl * 1e3:>11.1f} {t_ours * 1e3:>16.1f} "
              f"{t_tl / t_ours:>8.1f}x {max_diff:>11.2e}", flush=True)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    small = HookedLM.from_pretrained(SMALL_PAIR_DIR / "llada")
    world = FactSet.load(SMALL_PAIR_DIR / "world.json")
    pairs = patching_pairs(small, world, world.subset(split="forward_only"), "reverse")
    for lm in (small, wide_model(small)):
        bench(lm, pairs)


if __name__ == "__main__":
    main()
