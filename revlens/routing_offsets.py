"""A routing model's preference for each key offset: predicted by the RoPE kernel, read from its weights, measured.

The matched filter of :mod:`revlens.routing` says a route trained at ``+delta`` scores a key at
``r = key position - mask position`` as ``g(r) = K(r - delta)``, ``K(s) = sum_m cos(theta_m s)`` (RoPE,
Su et al. 2021; :func:`revlens.routing.matched_filter_score`). With **one** distractor the verdict is
per offset: in the reverse prompt (B at ``-delta``, the distractor at ``-o``) B wins iff
``K(2 delta) > K(delta + o)``; in the in-place prompt (B at ``+delta``, the distractor at ``+o``) iff
``K(0) > K(o - delta)``, which holds at every ``o != delta``. Three views of the same per-offset
preference, each usable before the next:

* from geometry alone: :func:`mirrored_filter_margin` / :func:`mirrored_filter_b_wins`;
* from a trained model's weights, before it is evaluated: :func:`read_route` reads each head's
  content-free score ``f_h(r) = q_h . R(r) kbar_h / sqrt(d_head)`` (the mask's query, the mean key of
  the B alphabet) and combines the heads as the model does (a softmax per head, outputs summed);
* measured: :func:`single_distractor_metrics` scores trained models on prompts with one distractor
  at each offset (:meth:`revlens.routing.RoutingWorld.single_distractor_prompts`), and
  :func:`offset_agreement` compares the measured winner with the kernel's, cell by cell.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from revlens.config import check_choice
from revlens.positions import apply_rope
from revlens.routing.measures import mask_row
from revlens.routing.predictors import matched_filter_score
from revlens.routing.world import MASK_ID, N_DISTRACTORS, ROUTING_EVAL_SETS, RoutingWorld, alphabet_ids, distractor_offsets

if TYPE_CHECKING:
    from revlens.model import ToyTransformer

NEAR_ZERO_MARGIN = 0.05
"""A kernel margin below this, in units of tr R / d (the margin divided by ``d_head / 2``), is near zero:
a small change of the learned filter could flip its verdict."""


# ---- from geometry alone ------------------------------------------------------------------------
def mirrored_filter_margin(d_head: int, delta: int, base: float, offset: int, query: str = "reverse") -> float:
    """B's matched-filter score minus a single distractor's at ``offset`` (see the module docstring):
    ``K(2 delta) - K(delta + offset)`` for the reverse query, ``K(0) - K(offset - delta)`` in place."""
    if type(offset) is not int or offset < 1 or offset == delta:
        raise ValueError(f"a distractor offset must be a positive integer other than delta={delta}, got {offset!r}")
    return matched_filter_score(d_head, delta, base, delta, query) - matched_filter_score(d_head, delta, base, offset, query)


def mirrored_filter_b_wins(d_head: int, delta: int, base: float, offset: int, query: str = "reverse") -> bool:
    """The kernel's winner with one distractor at ``offset``: B iff its score is strictly larger (a tie loses)."""
    return mirrored_filter_margin(d_head, delta, base, offset, query) > 0


def single_distractor_offsets(delta: int, n_ctx: int) -> list[int]:
    """Every offset a single distractor can take with B at ``delta`` in a context of ``n_ctx`` position
    ids: ``1 .. n_ctx - 1`` without ``delta`` (the default range ``1 .. 2 delta + 1`` and beyond)."""
    if delta >= n_ctx:
        raise ValueError(f"B's offset {delta} needs more than n_ctx={n_ctx} position ids")
    return [o for o in range(1, n_ctx) if o != delta]


# ---- measured -----------------------------------------------------------------------------------
@torch.no_grad()
def single_distractor_metrics(
    models: Sequence["ToyTransformer"], worlds: Sequence[RoutingWorld], objective: str = "inplace",
    offsets: Sequence[int] | None = None, queries: Sequence[str] = ROUTING_EVAL_SETS,
) -> list[dict[str, Any]]:
    """Per model, query and distractor offset, how the model answers prompts with B and one distractor.

    ``models[i]`` was trained on ``worlds[i]`` (RoPE, the sweep's one-layer models). ``offsets``: default
    :func:`single_distractor_offsets` for the model's context (also beyond ``2 delta + 1``); B's own offset
    is skipped, so one list serves models of several deltas. One row each:
    ``model`` (index), ``delta``, ``base``, ``d_head``, ``query``, ``offset``; ``acc`` and ``margin``
    (:func:`revlens.evaluation.answer_metrics`: argmax over the vocabulary is B's A; gold logit minus the best
    other); ``logit_gap``: B's A minus the distractor's A, mean over prompts; ``attn_b`` / ``attn_d``: the
    readout position's attention on B / on the distractor (mean over heads and prompts).
    """
    from revlens.evaluation import answer_metrics

    if len(models) != len(worlds) or not models:
        raise ValueError(f"need one world per model, got {len(models)} models and {len(worlds)} worlds")
    for query in queries:
        check_choice("query", query, ROUTING_EVAL_SETS)
    rows = []
    for i, (model, world) in enumerate(zip(models, worlds)):
        cfg = model.cfg
        if cfg.positional != "rotary":
            raise ValueError(f"model {i}: the per-offset kernel verdicts are about RoPE models, got {cfg.positional!r}")
        delta = world.eval_delta or world.delta
        for query in queries:
            for offset in single_distractor_offsets(delta, cfg.n_ctx) if offsets is None else [o for o in offsets if o != delta]:
                es, arranged, decoys = world.single_distractor_prompts(query, offset)
                read = mask_row(model, es, arranged, objective)
                if read is None:
                    raise ValueError(f"model {i}: the {query} prompt has no readout position for objective {objective!r}")
                gold = read.logits.gather(1, es.answers[:, None])[:, 0]
                metrics = answer_metrics(read.logits, es)
                rows.append({"model": i, "delta": delta, "base": cfg.rotary_base, "d_head": cfg.d_head, "query": query,
                             "offset": offset, "acc": metrics["acc"], "margin": metrics["margin"],
                             "logit_gap": (gold - read.logits.gather(1, decoys)[:, 0]).mean().item(),
                             "attn_b": read.on_b.mean().item(), "attn_d": read.on_d.mean().item()})
    return rows


def offset_agreement(rows: Sequence[dict[str, Any]], near_zero: float = NEAR_ZERO_MARGIN) -> dict[str, Any]:
    """How often the measured winner agrees with the kernel's, over (d_head, base, delta, query, offset) cells,
    beside two base-blind rules that could do as well.

    ``rows``: :func:`single_distractor_metrics` rows (or :func:`probe_offset_rows`); a cell's accuracy is the
    mean over its models, and B is the measured winner where it is above 0.5 (with one distractor, a coin between
    B and it scores 0.5). Returns ``cells`` (one dict per cell: ``acc``, ``n_models``, ``kernel_margin`` and
    ``kernel_margin_norm`` = margin / (d_head / 2), ``predicted_b_wins``, ``measured_b_wins``, ``agree``,
    ``near_zero``: the normalised margin's size is below ``near_zero``; ``inside``: the offset lies in the
    training layout's range ``1 .. 2 delta + 1``; the baselines' verdicts ``theta1_b_wins``, the kernel with
    RoPE's highest frequency only, the same at every base, and ``nearest_b_wins``, B nearer than the
    distractor), ``agreement`` (share of cells that agree), ``agreement_clear`` (the same without near-zero cells;
    NaN if none is left), ``agreement_theta1`` and ``agreement_nearest`` (the baselines' shares), ``n_cells``,
    ``n_near_zero``.
    """
    if not rows:
        raise ValueError("no rows to compare: pass single_distractor_metrics rows")
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        groups.setdefault((row["d_head"], row["base"], row["delta"], row["query"], row["offset"]), []).append(row["acc"])
    cells = []
    for (d_head, base, delta, query, offset), accs in groups.items():
        margin = mirrored_filter_margin(d_head, delta, base, offset, query)
        acc = sum(accs) / len(accs)
        predicted, measured = margin > 0, acc > 0.5
        cells.append({"d_head": d_head, "base": base, "delta": delta, "query": query, "offset": offset, "acc": acc,
                      "n_models": len(accs), "kernel_margin": margin, "kernel_margin_norm": margin / (d_head / 2),
                      "predicted_b_wins": predicted, "measured_b_wins": measured, "agree": predicted == measured,
                      "near_zero": abs(margin) / (d_head / 2) < near_zero, "inside": offset <= 2 * delta + 1,
                      "theta1_b_wins": mirrored_filter_b_wins(2, delta, base, offset, query),
                      "nearest_b_wins": offset > delta})
    clear = [c for c in cells if not c["near_zero"]]

    def share(cells_: list[dict[str, Any]], verdict: str = "predicted_b_wins") -> float:
        return sum(c[verdict] == c["measured_b_wins"] for c in cells_) / len(cells_) if cells_ else math.nan

    return {"cells": cells, "agreement": share(cells), "agreement_clear": share(clear),
            "agreement_theta1": share(cells, "theta1_b_wins"), "agreement_nearest": share(cells, "nearest_b_wins"),
            "n_cells": len(cells), "n_near_zero": len(cells) - len(clear)}


def dominant_period(values: Sequence[float]) -> float:
    """The period (in steps of the sequence) of the strongest non-constant Fourier component of ``values``, e.g.
    of whether B wins at consecutive offsets; NaN for a constant sequence or one shorter than four."""
    x = np.asarray(values, dtype=float)
    if len(x) < 4 or np.ptp(x) == 0:
        return math.nan
    power = np.abs(np.fft.rfft(x - x.mean()))[1:] ** 2
    return len(x) / (1 + int(power.argmax()))


def probe_offset_rows(table: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A probe table's rows (:func:`probe_rows`, one per model) as one row per model, query and offset, in the
    form of :func:`single_distractor_metrics` (``model`` = row index), with the weight reading's verdict
    (``weights_b_wins``) beside the measured accuracy: the input of :func:`offset_agreement`."""
    out = []
    for i, row in enumerate(table):
        for query in ROUTING_EVAL_SETS:
            wins_by_offset = row[f"{query}_weights_b_wins"] or [None] * len(row[f"{query}_offsets"])
            for offset, acc, gap, wins in zip(row[f"{query}_offsets"], row[f"{query}_single_acc"],
                                              row[f"{query}_single_logit_gap"], wins_by_offset):
                out.append({"model": i, "delta": row["delta"], "base": row["base"], "d_head": row["d_head"],
                            "seed": row["seed"], "query": query, "offset": offset, "acc": acc, "logit_gap": gap,
                            "weights_b_wins": wins})
    return out


# ---- from the weights ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RouteRead:
    """A one-layer RoPE model's content-free route, read from its weights (:func:`read_route`).

    Scores are pre-softmax, ``f_h(r) = q_h . R(r) kbar_h / sqrt(d_head)`` at ``r = -distance`` (reverse
    query) or ``+distance`` (in place)."""

    query: str
    delta: int
    offsets: tuple[int, ...]
    """The distractor offsets considered (distances from the mask)."""
    f_b: Float[Tensor, " head"]
    """Each head's score for B's offset."""
    f_d: Float[Tensor, "head offset"]
    """Each head's score for each distractor offset."""
    self_score: Float[Tensor, " head"]
    """Each head's score for the mask's own key (``r = 0``), which shares every softmax."""
    gain: Float[Tensor, " head"]
    """Each head's value-path gain: how much a unit of attention on a B raises the logit of the A it stores."""
    predicted_acc: float
    """Share of the equally likely distractor pairs (two of :attr:`offsets`) in which B gets more evidence
    than both distractors: the predicted accuracy of the two-distractor prompt."""
    single_b_wins: Bool[Tensor, " offset"]
    """Per offset, whether B gets more evidence than one distractor there (the single-distractor prompt)."""

    @property
    def head_margin(self) -> Float[Tensor, " head"]:
        """Per head, ``f(B) - max_o f(o)``: positive where the head alone prefers B to every distractor offset."""
        return self.f_b - self.f_d.max(-1).values

    @property
    def b_wins(self) -> bool:
        """The predicted verdict: B wins the two-distractor prompt in more than half of the pairs."""
        return self.predicted_acc > 0.5


def _b_wins(self_score: Float[Tensor, " head"], scores: Float[Tensor, "head key_pos"], gain: Float[Tensor, " head"]) -> bool:
    """Whether B (key 0 of ``scores``) gets more evidence than every distractor (the other keys): per key,
    each head's softmax weight (over the mask's own key and these) times the head's gain, summed over heads."""
    weights = torch.cat([self_score[:, None], scores], 1).softmax(-1)[:, 1:]
    evidence = (gain[:, None] * weights).sum(0)
    return bool(evidence[0] > evidence[1:].max())


def readable(cfg) -> bool:
    """Whether :func:`read_route` can read a model of this config: one layer, RoPE with shared ``W_Q, W_K``
    (with an MLP the scores are still exact, the heads' gains leave the MLP out). A deeper model's later
    queries read earlier layers' outputs, which depend on the prompt, so no content-free route exists."""
    return cfg.positional == "rotary" and cfg.n_layers == 1 and not cfg.untied_positions


@torch.no_grad()
def read_route(model: "ToyTransformer", delta: int, n_facts: int, offsets: Sequence[int] | None = None, query: str = "reverse") -> RouteRead:
    """Predict a trained model's selection in a routing prompt from its weights alone (no prompt is run).

    In a one-layer RoPE model the residual stream at the mask, where attention reads it, is the mask's token
    embedding (RoPE adds no positional embedding; positions enter only through the rotation of queries
    and keys), so the mask's query is ``q_h = W_E[mask] W_Q[h]`` wherever it sits, and a key ``r``
    positions away scores ``q_h . R(r) k / sqrt(d_head)``. With ``kbar_h`` the mean key of the B alphabet
    this is the content-free score ``f_h(r)``, computed here with the model's own rotation tables (query
    rotated at position ``p``, key at ``p + r``). Heads are combined as the model combines them: a softmax
    per head over the mask's own key and the prompt's entity keys, then the heads' outputs summed, each
    weighted by its value-path gain (mean over B tokens of the logit its ``W_V W_O W_U`` gives the A that
    the whole model's value path maps that B to, minus that row's mean over the A alphabet; with an MLP, the
    direct path only: an approximation of how the heads are combined, not of the scores).

    ``offsets``: the distractor offsets of the layout (default ``1 .. 2 delta + 1`` without ``delta``);
    ``query="reverse"``: keys before the mask, ``"inplace"``: after it. Takes only the model and the
    world's geometry (B's offset, the alphabet size); reads no prompt, no answer and no measured score.
    """
    cfg = model.cfg
    if not readable(cfg):
        raise ValueError("read_route reads one-layer models with shared RoPE W_Q, W_K; got "
                         f"positional={cfg.positional!r}, n_layers={cfg.n_layers}, "
                         f"untied_positions={cfg.untied_positions!r}")
    if cfg.attention_dir != "bidirectional":
        raise ValueError("read_route reads the mask's own query; a causal model answers from the position before it")
    check_choice("query", query, ROUTING_EVAL_SETS)
    offsets = tuple(distractor_offsets(delta) if offsets is None else offsets)
    if len(offsets) < N_DISTRACTORS or delta in offsets or min(offsets) < 1:
        raise ValueError(f"need at least {N_DISTRACTORS} positive distractor offsets other than delta={delta}, got {offsets}")
    if max(delta, *offsets) >= cfg.n_ctx or 2 * n_facts + 1 > cfg.d_vocab:
        raise ValueError(f"offsets up to {max(delta, *offsets)} or {n_facts} facts do not fit the model "
                         f"(n_ctx={cfg.n_ctx}, d_vocab={cfg.d_vocab})")
    attn = model.blocks[0].attn
    b_ids, a_ids = alphabet_ids("B", n_facts), alphabet_ids("A", n_facts)
    e_mask, e_b = model.W_E[MASK_ID], model.W_E[b_ids]
    q = torch.einsum("m,hmd->hd", e_mask, attn.W_Q)  # [head, d_head]
    k_bar = torch.einsum("bm,hmd->hd", e_b, attn.W_K) / len(b_ids)
    self_score = (q * torch.einsum("m,hmd->hd", e_mask, attn.W_K)).sum(-1) / math.sqrt(cfg.d_head)
    sign = -1 if query == "reverse" else 1
    rel = torch.tensor([sign * d for d in (delta, *offsets)])  # key position - mask position
    p_q = (-rel).clamp(min=0)  # query positions that keep both ids in 0 .. n_ctx - 1
    p_k = p_q + rel

    def rotate(x: Float[Tensor, "head d_head"], pos: Int[Tensor, " n"]) -> Float[Tensor, "n head d_head"]:
        return apply_rope(x.expand(len(pos), 1, *x.shape), attn.rope_cos[pos][:, None], attn.rope_sin[pos][:, None])[:, 0]

    f = (rotate(q, p_q) * rotate(k_bar, p_k)).sum(-1).T / math.sqrt(cfg.d_head)  # [head, 1 + n_offsets]
    ov = torch.einsum("bm,hmd,hdn,nv->hbv", e_b, attn.W_V, attn.W_O, model.W_U[:, a_ids])  # [head, B, A]
    stored = ov.sum(0).argmax(-1)  # the A the whole value path maps each B to
    gain = (ov.gather(2, stored.expand(ov.shape[0], -1)[..., None])[..., 0] - ov.mean(-1)).mean(-1)
    single = torch.tensor([_b_wins(self_score, f[:, [0, 1 + j]], gain) for j in range(len(offsets))])
    pairs = list(itertools.combinations(range(1, 1 + len(offsets)), N_DISTRACTORS))
    share = sum(_b_wins(self_score, f[:, [0, *pair]], gain) for pair in pairs) / len(pairs)
    return RouteRead(query, delta, offsets, f[:, 0], f[:, 1:], self_score, gain, share, single)


# ---- one sweep row per model: read from the weights first, then measured -------------------------
SWEEP_FILE = Path("data/routing_offsets_sweep.json")
"""The probe sweep: the routing sweep's core cell retrained with ``"probe": "offsets"`` (:func:`probe_sweep`)."""
TABLE_FILE = Path("data/routing_offsets.jsonl")


def probe_rows(model: "ToyTransformer", world: RoutingWorld, objective: str) -> dict[str, Any]:
    """A trained routing model's per-offset preference, per query (``reverse``, ``inplace``): first from its
    weights alone (:func:`read_route`), then measured, so nothing measured can inform the reading.

    Keys, each prefixed by the query: ``offsets`` (every single-distractor offset the context allows);
    ``weights_b_wins`` (per offset, the weight reading's verdict with one distractor there);
    ``weights_acc`` (the weight reading's predicted accuracy on the default two-distractor prompts);
    ``single_acc`` / ``single_logit_gap`` (measured per offset: accuracy, and B's A minus the distractor's A in
    logits, mean over prompts; :func:`single_distractor_metrics`); ``acc`` (measured on the default prompts).
    The weight reading is ``None`` for a model :func:`readable` rejects (deeper than one layer)."""
    from revlens.evaluation import evaluate

    delta = world.eval_delta or world.delta
    offsets = single_distractor_offsets(delta, model.cfg.n_ctx)
    row: dict[str, Any] = {}
    for query in ("reverse", "inplace"):
        row[f"{query}_offsets"] = offsets
        if not readable(model.cfg):  # no content-free route to read (see readable): None, never a guess
            row |= {f"{query}_weights_b_wins": None, f"{query}_weights_acc": None}
            continue
        everywhere = read_route(model, delta, world.n_facts, offsets, query)
        default = read_route(model, delta, world.n_facts, None, query)
        row |= {f"{query}_weights_b_wins": [bool(b) for b in everywhere.single_b_wins],
                f"{query}_weights_acc": round(default.predicted_acc, 6)}
    for query in ("reverse", "inplace"):
        measured = single_distractor_metrics([model], [world], objective, offsets, (query,))
        row |= {f"{query}_single_acc": [round(m["acc"], 6) for m in measured],
                f"{query}_single_logit_gap": [round(m["logit_gap"], 4) for m in measured]}
    scores = evaluate(model, world, objective)  # type: ignore[arg-type]
    return row | {f"{query}_acc": round(scores[f"{query}_acc"], 6) for query in ("reverse", "inplace")}


def probe_sweep(routing_sweep: dict[str, Any]) -> dict[str, Any]:
    """The probe sweep file: the routing sweep file's ``core`` cell, world, training settings, seeds and stack
    size as they are (so its models are the core models; each row's config hash is the core row's plus the
    probe), with ``"probe": "offsets"``."""
    from revlens.routing.sweep import RoutingSweepSpec

    core = next((c for c in routing_sweep.get("cells", []) if c.get("name") == "core"), None)
    if core is None:
        raise ValueError("the routing sweep file has no 'core' cell to probe")
    sweep = {"name": "routing_offsets", "family": "routing", "probe": "offsets",
             **{k: routing_sweep[k] for k in ("world", "train", "seeds", "stack_size") if k in routing_sweep},
             "cells": [core]}
    RoutingSweepSpec.from_dict(sweep)  # the engine accepts it
    return sweep


DEEP_SWEEP_FILE = Path("data/routing_deep_sweep.json")
"""The core recipe with two layers, with an MLP, and with both (:func:`deep_sweep`)."""
DEEP_TABLE_FILE = Path("data/routing_deep.jsonl")
DEEP_CELLS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("mlp", {"attn_only": False}), ("two-layer", {"n_layers": 2}), ("two-layer-mlp", {"n_layers": 2, "attn_only": False}))
"""Beyond one attention-only layer: each cell's name and its change to the core model."""
DEEP_DELTAS = (2, 3, 4, 6, 8, 12, 16)


def deep_sweep(routing_sweep: dict[str, Any]) -> dict[str, Any]:
    """The probe sweep of :data:`DEEP_CELLS`: the routing sweep file's core recipe (objective, world, training,
    seeds, bases) with each cell's model change, at :data:`DEEP_DELTAS`, probed like the core models
    (:func:`probe_rows`; deeper models get no weight reading)."""
    core = probe_sweep(routing_sweep)
    recipe = core["cells"][0]
    cells = [{**recipe, "name": name, "group": "beyond one attention-only layer", "model": {**recipe.get("model", {}), **change},
              "deltas": [d for d in DEEP_DELTAS if d in recipe["deltas"]]} for name, change in DEEP_CELLS]
    sweep = {**core, "name": "routing_deep", "cells": cells}
    from revlens.routing.sweep import RoutingSweepSpec

    RoutingSweepSpec.from_dict(sweep)
    return sweep


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m revlens.routing_offsets``: write the probe sweep files (the core cell; the deeper cells) from
    the routing sweep file; each is trained with ``revlens sweep FILE --out TABLE`` (the command printed)."""
    import argparse

    from revlens.atomic import write_json_atomic
    from revlens.config import load_json

    parser = argparse.ArgumentParser(prog="python -m revlens.routing_offsets", description=main.__doc__)
    parser.add_argument("--routing-sweep", default="data/routing_sweep.json", help="routing sweep file to probe")
    parser.add_argument("--out", default=str(SWEEP_FILE), help="probe sweep file to write")
    parser.add_argument("--deep-out", default=str(DEEP_SWEEP_FILE), help="probe sweep file of the deeper cells")
    args = parser.parse_args(argv)
    routing = load_json(args.routing_sweep)
    for path, sweep, table in ((args.out, probe_sweep(routing), TABLE_FILE), (args.deep_out, deep_sweep(routing), DEEP_TABLE_FILE)):
        write_json_atomic(path, sweep)
        print(f"written {path}; train it with: revlens sweep {path} --out {table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
