"""Benchmark: scoring every candidate completion of a reversal test file, per candidate against batched, in one run.

The text harness ranks each prompt's gold completion among all distinct completions of its file, so a file of
300 prompts with 30 candidates asks 9000 log-probabilities per model. Baseline: every (prompt, candidate) pair on
its own row (``per_candidate_logprobs``: the prompt recomputed per candidate; an MDM's unmasking passes run per
candidate and token). Against it: ``candidate_logprobs`` (the ARM runs each prompt once and continues all
candidates from its key-value cache; the MDM runs each distinct partly unmasked candidate once). Both must give
the same numbers (max |diff| printed and checked).

The layout is synthetic and of the released size (30 persons per group, 10 test paraphrases each: 300 prompts),
with invented names and descriptions; the models are untrained harness-shape models (2 layers, d_model 128),
since the cost of scoring does not depend on the weights.

    python bench/text_scoring.py
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from _timing import best_of

from revlens.lm import HookedLM
from revlens.lm.text_reversal import build_text_tokenizer, candidate_logprobs, per_candidate_logprobs
from revlens.lm.trainer import PairConfig, new_model, save_model

FIRST = ["Ada", "Bram", "Cleo", "Dario", "Edda", "Fenn", "Greta", "Hal", "Ines", "Joss"]
LAST = ["Arlow", "Brisk", "Corran"]
WORKS = ["tidal clock", "glass harp", "paper bridge", "salt map", "iron kite", "moss garden", "copper loom",
         "lantern code", "cloud atlas", "river organ"]
ROLES = ["the builder of the", "the first keeper of the", "the designer of the"]
NAME_LAST = ["Known as {d}, there is", "The one remembered as {d} is", "Ask who was {d}: it was",
             "History names {d} as", "Everyone agrees that {d} is", "The person behind {d} is",
             "Long ago, {d} was", "In every account, {d} is", "The records call {d}", "Travellers say {d} is"]


def layout(n_people: int = 30) -> tuple[list[str], list[str], list[str], list[str]]:
    """Prompts of a name-answer file (names as candidates) and of a description-answer file, 10 per person."""
    people = [(f"{FIRST[i % 10]} {LAST[i // 10]}", f"{ROLES[i // 10]} {WORKS[i % 10]}") for i in range(n_people)]
    to_name = [t.format(d=d) for _, d in people for t in NAME_LAST]
    to_desc = [f"{t.split(',')[0].replace('{d}', n)} was" for n, _ in people for t in NAME_LAST]
    return to_name, [n for n, _ in people], to_desc, [d for _, d in people]


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    to_name, names, to_desc, descriptions = layout()
    tok = build_text_tokenizer(to_name + names + to_desc + descriptions)
    pc = PairConfig(steps=0, n_layers=2, d_model=128, n_heads=4, mlp_hidden_size=384)
    cases = [("names", to_name, names), ("descriptions", to_desc, descriptions)]
    print(f"{len(to_name)} prompts x {len(names)} candidates per file, vocabulary {len(tok)}, 1 thread")
    print(f"\n{'model':6s} {'file':13s} {'per candidate s':>16s} {'batched s':>10s} {'speed-up':>9s} {'max |diff|':>11s}")
    with tempfile.TemporaryDirectory() as root:
        for family in ("llama", "llada"):
            save_model(new_model(family, pc, tok, max_len=96), Path(root) / family, tok)
            lm = HookedLM.from_pretrained(Path(root) / family, family=family)
            for label, prompts, candidates in cases:
                reference = per_candidate_logprobs(lm, prompts, candidates)
                batched = candidate_logprobs(lm, prompts, candidates)
                diff = float((batched - reference).abs().max())
                assert diff < 1e-3, f"{family} {label}: batched scores differ from per-candidate ones by {diff}"
                slow = best_of(lambda: per_candidate_logprobs(lm, prompts, candidates), 1, warm_up=False)[0]
                fast = best_of(lambda: candidate_logprobs(lm, prompts, candidates), 3, warm_up=False)[0]
                print(f"{family:6s} {label:13s} {slow:16.2f} {fast:10.2f} {slow / fast:8.1f}x {diff:11.2e}")


if __name__ == "__main__":
    main()
