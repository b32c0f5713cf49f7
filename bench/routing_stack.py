"""Benchmark: the routing sweep's stacked training vs training the same settings one at a time.

The members differ in offset (data), world seed (data) and RoPE base (buffers) -- the shape of the
routing sweep's core cell (``--cell`` takes another cell's; from a filler-layout cell, whose sentence
length grows with the offset, the members of its first offset). Both ways run in the same process on the same members; the script
reports wall times, the ratio and the largest weight difference (0: bit for bit).

    python bench/routing_stack.py [--members 30] [--steps 100] [--cell core]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from _timing import best_of

from revlens.routing import RoutingSweepSpec
from revlens.stack import Member, train_stack

SPEC = Path(__file__).resolve().parents[1] / "data" / "routing_sweep.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=30, help="settings taken from the cell, in file order")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--cell", default="core", help="the sweep file's cell to take members from")
    parser.add_argument("--objective", choices=("inplace", "mdm", "arm"), default=None, help="default: the cell's")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = RoutingSweepSpec.from_dict(json.loads(SPEC.read_text()))
    core = [job for job in spec.jobs() if job[0].name == args.cell]
    if not core:
        parser.error(f"no cell {args.cell!r} in {SPEC}")
    if core[0][0].layout == "fillers":  # sentences of one length stack: one offset
        core = [job for job in core if job[1] == core[0][1]]
    # spread over offsets, bases and seeds rather than the first offset's models only
    picked = core[:: max(1, len(core) // args.members)][: args.members]
    members = []
    for cell, delta, base, seed in picked:
        world = spec.world_for(delta, seed, cell.layout)
        members.append(Member(cell.model_cfg(world, base), world, seed))
    train_cfg = dataclasses.replace(spec.train_for(picked[0][0]), steps=args.steps)
    if args.objective is not None:
        train_cfg = dataclasses.replace(train_cfg, objective=args.objective)
    models: dict[str, list] = {}
    shift = picked[0][0].shift_positions

    def stacked() -> None:
        models["stacked"] = train_stack(members, train_cfg, progress=False, shift_positions=shift)

    def one_at_a_time() -> None:
        models["alone"] = [train_stack([m], train_cfg, progress=False, shift_positions=shift)[0] for m in members]

    t_stacked, _ = best_of(stacked, repeats=1)
    t_alone, _ = best_of(one_at_a_time, repeats=1)
    max_diff = max(
        (p - q).abs().max().item()
        for s, a in zip(models["stacked"], models["alone"])
        for p, q in zip(s.parameters(), a.parameters())
    )
    work = len(members) * args.steps
    print(f"{len(members)} members (offsets {sorted({j[1] for j in picked})}, bases {sorted({j[2] for j in picked})}), "
          f"{args.steps} steps, cell {args.cell}, objective {train_cfg.objective}, 1 thread")
    print(f"one at a time: {t_alone:.2f} s ({work / t_alone:.0f} model-steps/s)")
    print(f"stacked:       {t_stacked:.2f} s ({work / t_stacked:.0f} model-steps/s)")
    print(f"ratio {t_alone / t_stacked:.2f}x, max |dW| {max_diff:.1e}")


if __name__ == "__main__":
    main()
