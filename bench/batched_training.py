"""Benchmark: K model instances trained as one batched run vs K sequential single-model runs.

Same models (seeds 0..K-1), same data, same steps, measured in one process after a warm-up; reports
the best wall time of two repeats, per-model throughput (model-steps per second) and its ratio, and
the largest weight difference between the two ways, for several per-model batch sizes.

The baseline is ``train(..., seeds=[s])``, which trains one model as a plain PyTorch module (forward,
``backward``, AdamW): the way one would train it alone, with no stacking and no ``vmap``. The batched
run stacks the K models' parameters and vmaps one forward pass over them (and one evaluation pass at
each logged step). Batching removes per-step overhead (Python, dispatch, autograd bookkeeping, one
optimiser call and one evaluation instead of K); it cannot remove arithmetic. A sequential step of
this one-layer model costs about 2 ms of overhead plus compute that grows with the batch, so the gain
is largest at small per-model batches and shrinks towards 1x as a step becomes compute-bound (the
notebooks train with batch 256).

    python bench/batched_training.py [--instances 16] [--steps 100] [--batch-sizes 8 16 32 64 128 256]
"""

from __future__ import annotations

import argparse

import torch
from _timing import best_of

from revlens.experiments import SETTINGS
from revlens.training import TrainConfig, TrainRun, train
from revlens.world import ReversalWorld


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    args = parser.parse_args()
    torch.set_num_threads(2)
    world = ReversalWorld.generate(n_facts=200, n_control=40, seed=0)
    cfg = SETTINGS["MDM"].model_cfg(world)
    seeds = list(range(args.instances))
    print(f"{args.instances} instances x {args.steps} steps, one-layer MDM (d=64, 4 heads, vocab {cfg.d_vocab})")
    print(f"{'batch':>6} {'sequential s':>13} {'batched s':>10} {'model-steps/s seq':>18} {'batched':>8} "
          f"{'ratio':>6} {'max |dW|':>9}")
    for batch_size in args.batch_sizes:
        train_cfg = TrainConfig("mdm", steps=args.steps, batch_size=batch_size, log_every=args.steps)
        runs: dict[str, list[TrainRun]] = {}

        def batched() -> None:
            runs["batched"] = train(cfg, world, train_cfg, seeds, progress=False)

        def sequential() -> None:
            runs["alone"] = [train(cfg, world, train_cfg, [s], progress=False)[0] for s in seeds]

        t_batched, _ = best_of(batched, repeats=2)
        t_alone, _ = best_of(sequential, repeats=2)
        max_diff = max(
            (p - q).abs().max().item()
            for b, a in zip(runs["batched"], runs["alone"])
            for p, q in zip(b.model.parameters(), a.model.parameters())
        )
        work = args.instances * args.steps
        print(f"{batch_size:>6} {t_alone:>13.2f} {t_batched:>10.2f} {work / t_alone:>18.1f} {work / t_batched:>8.1f} "
              f"{t_alone / t_batched:>5.2f}x {max_diff:>9.1e}")


if __name__ == "__main__":
    main()
