"""Benchmark: batched activation patching vs ``transformer_lens.patching`` on the shipped small MDM.

Both sweep every (layer, position) of the residual stream on the same reverse-query pairs, in the
same run; the script reports the speed ratio and the largest absolute difference (target: >= 5x,
< 1e-5). ``revlens.patching`` runs all sites in one forward pass; TransformerLens runs one per site.
The gain is the per-pass overhead saved, so it is reported for several numbers of prompt pairs: with a
few pairs (the usual patching experiment) a pass is overhead-bound and batching wins; with ~100 pairs one
pass already saturates 2 CPU cores and both approaches do the same arithmetic.

    python bench/batched_patching.py
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os

import torch
import transformer_lens.patching as tl_patching
from _timing import best_of

from revlens.facts import FactSet
from revlens.lm import HookedLM
from revlens.lm.analysis import answer_logprob_metric, patching_pairs
from revlens.lm.small_pair import SMALL_PAIR_DIR
from revlens.patching import patch_names, patch_resid_pre


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    lm = HookedLM.from_pretrained(SMALL_PAIR_DIR / "llada")
    world = FactSet.load(SMALL_PAIR_DIR / "world.json")
    all_pairs = patching_pairs(lm, world, world.subset(split="forward_only"), "reverse")
    print(f"resid_pre patching on {lm}")
    print(f"{'pairs':>6} {'sites':>6} {'TL best ms':>11} {'batched best ms':>16} {'speed-up':>9} {'max |diff|':>11}")
    for n_pairs in (1, 4, 16, len(all_pairs.facts)):
        pairs = dataclasses.replace(all_pairs, clean=all_pairs.clean[:n_pairs], corrupted=all_pairs.corrupted[:n_pairs],
                                    answer=all_pairs.answer[:n_pairs], facts=all_pairs.facts[:n_pairs])
        metric = answer_logprob_metric(pairs)
        _, cache = lm.run_with_cache(pairs.clean, patch_names(lm, "resid_pre"))

        def baseline():
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # TL's per-site progress bar
                return tl_patching.get_act_patch_resid_pre(lm.bridge, pairs.corrupted, cache, metric)

        def batched():
            return patch_resid_pre(lm, pairs.corrupted, cache, metric)

        max_diff = (baseline() - batched()).abs().max().item()
        (t_tl, _), (t_ours, _) = best_of(baseline, 5), best_of(batched, 5)
        sites = lm.cfg.n_layers * pairs.clean.shape[1]
        print(f"{n_pairs:>6} {sites:>6} {t_tl * 1e3:>11.1f} {t_ours * 1e3:>16.1f} {t_tl / t_ours:>8.1f}x {max_diff:>11.2e}")

if __name__ == "__main__":
    main()
