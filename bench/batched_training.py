"""Benchmark: K model instances trained as one vmapped run vs K sequential single-model runs.

Same models (seeds 0..K-1), same data, same steps, measured in one process; reports wall time,
per-model throughput ratio and the largest weight difference between the two ways.

    python bench/batched_training.py [--instances 16] [--steps 200]
"""

from __future__ import annotations

import argparse
import time

import torch

from revlens.experiments import SETTINGS
from revlens.training import TrainConfig, train
from revlens.world import ReversalWorld


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(2)
    world = ReversalWorld.generate(n_facts=200, n_control=40, seed=0)
    cfg = SETTINGS["MDM"].model_cfg(world)
    train_cfg = TrainConfig("mdm", steps=args.steps, batch_size=args.batch_size, log_every=args.steps)
    seeds = list(range(args.instances))

    start = time.perf_counter()
    batched = train(cfg, world, train_cfg, seeds, progress=False)
    t_batched = time.perf_counter() - start
    start = time.perf_counter()
    alone = [train(cfg, world, train_cfg, [s], progress=False)[0] for s in seeds]
    t_alone = time.perf_counter() - start

    max_diff = max(
        (p - q).abs().max().item()
        for b, a in zip(batched, alone)
        for p, q in zip(b.model.parameters(), a.model.parameters())
    )
    print(f"{args.instances} instances x {args.steps} steps, batch {args.batch_size}, one-layer MDM (d=64, 4 heads)")
    print(f"  sequential (baseline): {t_alone:7.2f} s   {args.instances * args.steps / t_alone:8.1f} model-steps/s")
    print(f"  batched (vmap):        {t_batched:7.2f} s   {args.instances * args.steps / t_batched:8.1f} model-steps/s")
    print(f"  per-model throughput ratio: {t_alone / t_batched:.2f}x   max |weight difference|: {max_diff:.2e}")


if __name__ == "__main__":
    main()
