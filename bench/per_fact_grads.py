"""Benchmark: per-fact gradients by torch.func (vmap over grad) vs a loop of backward passes.

Both are measured in the same run on the same model and the same 200 facts; the script reports the
speed ratio and the largest absolute difference between the two results (target: >= 5x, < 1e-5).

    python bench/per_fact_grads.py
"""

from __future__ import annotations

import torch

from _timing import best_of

from revlens.dynamics import per_fact_grads, per_fact_grads_loop, toy_loss_queries
from revlens.experiments import SETTINGS
from revlens.training import init_model
from revlens.world import ReversalWorld


def main() -> None:
    torch.set_num_threads(2)
    world = ReversalWorld.generate(n_facts=240, n_control=40, seed=0)  # 200 forward-only facts
    model = init_model(SETTINGS["MDM"].model_cfg(world), seed=0).eval()
    fwd, _ = toy_loss_queries(world, "mdm")
    assert len(fwd.answers) == 200
    fast, slow = per_fact_grads(model, fwd), per_fact_grads_loop(model, fwd)
    max_diff = max((fast[n] - slow[n]).abs().max().item() for n in fast)
    (t_func, m_func), (t_loop, m_loop) = best_of(lambda: per_fact_grads(model, fwd)), best_of(lambda: per_fact_grads_loop(model, fwd))
    print(f"per-fact gradients, 200 facts, {sum(p.numel() for p in model.parameters())} parameters")
    print(f"  loop of backward passes (baseline): best {t_loop * 1e3:8.1f} ms  median {m_loop * 1e3:8.1f} ms")
    print(f"  torch.func vmap(grad):              best {t_func * 1e3:8.1f} ms  median {m_func * 1e3:8.1f} ms")
    print(f"  speed-up (best/best): {t_loop / t_func:.1f}x   max |difference|: {max_diff:.2e}")


if __name__ == "__main__":
    main()
