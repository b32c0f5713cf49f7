"""Benchmark: would batching several small-pair runs into one step speed them up?

K models trained side by side in one batched (vmapped) step cost at least what one model's step on a K-times
larger batch costs (the same token FLOPs, fewer weights). This script times both for the shipped pair's
MDM: K sequential optimizer steps of separate models against one step of one model on K x the batch, in the
same process, and reports the ratio -- the most a batched step of K runs could gain. Near 1, the step is
compute-bound and separate worker processes (``revlens small-pair --jobs``) are the way to use more cores.

    python bench/small_pair_batching.py [--models 4] [--layers 4]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
from _timing import best_of

from revlens.lm.corpus import build_tokenizer, make_world
from revlens.lm.small_pair import SHIPPED_PAIR, length_buckets
from revlens.lm.trainer import new_model, optimizer_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=4, help="K: runs that would share a batched step")
    parser.add_argument("--layers", type=int, default=SHIPPED_PAIR.n_layers)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tok = build_tokenizer()
    world = make_world(SHIPPED_PAIR.n_facts, seed=0)
    buckets = length_buckets(world, tok)
    biggest = [max(buckets, key=lambda b: len(b.tokens))]  # one bucket: every step has the same shape
    sizes = torch.ones(1)

    def stepper(pc, n_models):
        models = [new_model("llada", replace(pc, seed=k), tok) for k in range(n_models)]
        opts = [torch.optim.AdamW(m.parameters(), lr=pc.lr) for m in models]
        gen = torch.Generator().manual_seed(0)
        return lambda: [optimizer_step(m, "mdm", biggest, sizes, tok.mask_token_id, pc, gen, o) for m, o in zip(models, opts)]

    pc = replace(SHIPPED_PAIR, n_layers=args.layers)
    separate, _ = best_of(stepper(pc, args.models), repeats=10)
    one_big, _ = best_of(stepper(replace(pc, batch_size=pc.batch_size * args.models), 1), repeats=10)
    print(f"{args.layers}-layer MDM, batch {pc.batch_size}, 1 thread: {args.models} separate steps {separate * 1e3:.0f} ms; "
          f"one step on {args.models}x the batch {one_big * 1e3:.0f} ms; most a batched step could gain: "
          f"{separate / one_big:.2f}x")


if __name__ == "__main__":
    main()
