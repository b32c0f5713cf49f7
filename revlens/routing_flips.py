"""Pre-registered flips: distractor layouts for which the matched filter reverses its own verdict.

The matched filter (:func:`revlens.routing.matched_filter_reverse_accuracy`) predicts the reverse
accuracy of a route trained at ``+delta`` from the RoPE kernel alone: B, at ``-delta``, scores
``K(2 delta)``; a distractor at ``-o`` scores ``K(delta + o)``, ``K(s) = sum_m cos(theta_m s)`` (Su et al.
2021; conventions in :func:`revlens.routing.matched_filter_score`). Its verdict depends on where the
distractors may sit, so a layout can be chosen to reverse it:

* a ``(delta, base)`` whose default layout (``1 .. 2 delta + 1`` without ``delta``) fails is made to
  succeed by keeping every distractor off the offsets that beat B (``fail->succeed``);
* one whose default layout succeeds is made to fail by putting distractors only on offsets that beat
  B (``succeed->fail``).

:func:`select_flips` picks such cells from geometry alone (kernel, delta, base, d_head, the candidate
offsets; no trained weight, no measured accuracy). :func:`flip_files` turns them into a routing sweep
file (the core recipe, :data:`SWEEP_FILE`) and a prediction file (:data:`PREDICTIONS_FILE`) that states
each cell's predicted verdict, its default-layout verdict, the margins and the rule that judges it;
:func:`write_flip_files` writes both once, before any model they predict is trained, and
:func:`check_flips` judges the trained rows by the rule the file states. :func:`flip_report` and
:func:`flip_scores` set each judged cell beside its default layout and the nearest-key baseline;
:func:`registration_commit` / :func:`registered_before` name the commits that added the prediction file and
the trained table, and whether the first precedes the second.
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from revlens import provenance
from revlens.atomic import write_json_atomic
from revlens.config import load_json
from revlens.routing.measures import N_CTX
from revlens.routing.predictors import matched_filter_reverse_accuracy, matched_filter_score, nearest_key_share
from revlens.routing.sweep import RoutingSweepSpec
from revlens.routing.world import N_DISTRACTORS, distractor_offsets

if TYPE_CHECKING:
    import pandas as pd

DATA = Path(__file__).resolve().parents[1] / "data"
ROUTING_SWEEP_FILE = DATA / "routing_sweep.json"
SWEEP_FILE = DATA / "routing_flips_sweep.json"
PREDICTIONS_FILE = DATA / "routing_flips_predictions.json"
TABLE_FILE = DATA / "routing_flips.jsonl"
DIRECTIONS: tuple[str, ...] = ("fail->succeed", "succeed->fail")

MARGIN_TOL = 0.05
"""Every offset of a flip layout must lose to B (``fail->succeed``) or beat it (``succeed->fail``) by at
least this much, in units of tr R / d (a kernel difference divided by ``d_head / 2``)."""
FAILS_TODAY, SUCCEEDS_TODAY = 0.25, 0.75
"""A default layout whose matched-filter accuracy is at most / at least this has a clear verdict to flip."""

RULE: dict[str, Any] = {
    "statistic": "reverse_acc",
    "aggregate": "mean over the cell's seeds",
    "b_wins_above": 0.5,
    "void_if_inplace_acc_below": 0.9,
    "text": ("A cell's measured verdict is 'B wins' iff the mean over its seeds of reverse_acc (the two-distractor "
             "reverse query, exact-token accuracy) is above 0.5, half-way between the 0 and 1 that the matched "
             "filter predicts (a guess among B and its two distractors scores 1/3). The cell is a hit iff that "
             "verdict equals predicted_b_wins, a miss otherwise; it is void (neither) if the mean in-place "
             "accuracy is below 0.9, since the prediction is about a route that learned the in-place query. Every "
             "seed of the sweep file must have its row: a missing seed is an error, not a miss."),
}
"""The rule that judges each flip cell, fixed before any flip model is trained (written into the prediction file)."""


@dataclass(frozen=True)
class Flip:
    """A ``(delta, base)`` cell and the distractor offsets that reverse its default-layout verdict."""

    direction: str
    delta: int
    base: float
    d_head: int
    offsets: tuple[int, ...]

    @property
    def name(self) -> str:
        """The sweep cell's name, e.g. ``succeed-d4-b1e2``: the verdict the layout predicts, delta, RoPE base."""
        exponent = math.log10(self.base)
        base = f"1e{round(exponent)}" if exponent == round(exponent) else f"{self.base:g}"
        return f"{self.direction.split('->')[1]}-d{self.delta}-b{base}"


def layout_verdict(d_head: int, delta: int, base: float, offsets: Sequence[int] | None = None) -> dict[str, Any]:
    """The matched filter's reverse verdict for distractors drawn (two at a time) from ``offsets`` (default
    the default layout), with the numbers behind it.

    ``share``: the predicted accuracy (pairs where B beats both, ties lose); ``b_wins``: ``share > 0.5``;
    ``kernel_b`` = ``K(2 delta)``, ``kernel_distractors`` = ``{o: K(delta + o)}``; ``margin`` =
    ``K(2 delta) - max_o K(delta + o)``; ``pair_margin_min`` / ``_max``: over the pairs, B's score minus the
    pair's larger one (all positive: B wins every pair; all negative: it loses every pair); ``*_norm``: the
    same divided by ``d_head / 2`` (units of tr R / d); ``nearest_key_share``: the nearest-key baseline's
    accuracy on the same layout."""
    offsets = list(distractor_offsets(delta) if offsets is None else offsets)
    kernel_b = matched_filter_score(d_head, delta, base, delta)
    kernel_d = {o: matched_filter_score(d_head, delta, base, o) for o in offsets}
    pairs = [kernel_b - max(kernel_d[a], kernel_d[b]) for a, b in itertools.combinations(offsets, N_DISTRACTORS)]
    share = matched_filter_reverse_accuracy(d_head, delta, base, offsets=offsets)
    norm = d_head / 2
    margin = kernel_b - max(kernel_d.values())
    return {"share": share, "b_wins": share > 0.5, "kernel_b": kernel_b, "kernel_distractors": kernel_d,
            "margin": margin, "margin_norm": margin / norm, "pair_margin_min": min(pairs), "pair_margin_max": max(pairs),
            "pair_margin_min_norm": min(pairs) / norm, "pair_margin_max_norm": max(pairs) / norm,
            "nearest_key_share": nearest_key_share(delta, offsets)}


def flip_layout(d_head: int, delta: int, base: float, n_ctx: int = N_CTX, tol: float = MARGIN_TOL) -> Flip | None:
    """The layout that reverses the default verdict of ``(delta, base)``, or ``None`` (no clear verdict, or
    too few offsets that lose to / beat B by ``tol``).

    A default layout that fails (accuracy at most :data:`FAILS_TODAY`) keeps the default offsets that B
    beats by at least ``tol``; one that succeeds (at least :data:`SUCCEEDS_TODAY`) keeps those that beat B
    by at least ``tol``. Where fewer than two default offsets qualify, the nearest qualifying offsets beyond
    ``2 delta + 1`` (up to the context, ``n_ctx - 1``) are added to make two."""
    share = matched_filter_reverse_accuracy(d_head, delta, base)
    if share <= FAILS_TODAY:
        direction, sign = DIRECTIONS[0], 1
    elif share >= SUCCEEDS_TODAY:
        direction, sign = DIRECTIONS[1], -1
    else:
        return None
    kernel_b = matched_filter_score(d_head, delta, base, delta)
    lead = {o: sign * (kernel_b - matched_filter_score(d_head, delta, base, o)) / (d_head / 2)
            for o in range(1, n_ctx) if o != delta}  # how clearly o goes the flip's way
    within = [o for o in distractor_offsets(delta) if o < n_ctx and lead[o] >= tol]
    beyond = [o for o in range(2 * delta + 2, n_ctx) if lead[o] >= tol]
    offsets = within + beyond[: max(0, N_DISTRACTORS - len(within))]
    if len(offsets) < N_DISTRACTORS:
        return None
    return Flip(direction, delta, float(base), d_head, tuple(sorted(offsets)))


def _rank(flip: Flip) -> tuple[bool, bool, float]:
    """Preference among candidate flips: offsets inside the default range (the route was trained there
    in the default cells too), the nearest-key baseline predicting the other verdict, the clearest pair."""
    v = layout_verdict(flip.d_head, flip.delta, flip.base, flip.offsets)
    within = max(flip.offsets) <= 2 * flip.delta + 1
    discriminating = (v["nearest_key_share"] > 0.5) != v["b_wins"]
    clearest = v["pair_margin_min_norm"] if v["b_wins"] else -v["pair_margin_max_norm"]
    return within, discriminating, clearest


def select_flips(d_head: int, deltas: Sequence[int], bases: Sequence[float], n_ctx: int = N_CTX,
                 tol: float = MARGIN_TOL, per_base: int = 1) -> list[Flip]:
    """Per direction and RoPE base, the ``per_base`` best :func:`flip_layout` cells over ``deltas`` (ranked
    by :func:`_rank`), fails-today cells first; geometry only."""
    chosen = []
    for direction in DIRECTIONS:
        for base in sorted(bases):
            flips = [f for f in (flip_layout(d_head, d, base, n_ctx, tol) for d in deltas) if f and f.direction == direction]
            chosen += sorted(flips, key=_rank, reverse=True)[:per_base]
    return chosen


def _core(routing_sweep: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The routing sweep file's ``core`` cell (the recipe the flips copy) and its head size."""
    spec = RoutingSweepSpec.from_dict(routing_sweep)
    core = next((c for c in routing_sweep["cells"] if c["name"] == "core"), None)
    if core is None:
        raise ValueError("the routing sweep file has no 'core' cell to copy the recipe from")
    cell = next(c for c in spec.cells if c.name == "core")
    return core, cell.model_cfg(spec.world_for(cell.deltas[0], spec.seeds[0]), cell.bases[0]).d_head


def flip_files(routing_sweep: dict[str, Any], tol: float = MARGIN_TOL, per_base: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    """The flip sweep file and the prediction file, from the routing sweep file's content (its core cell's
    objective, model, offsets and bases; its world, training settings, seeds and stack size)."""
    core, d_head = _core(routing_sweep)
    if core.get("distractor_offsets") is not None or core.get("layout", "gaps") != "gaps":
        raise ValueError("the core cell must use the default layout (gaps, default distractor offsets)")
    bases = core.get("bases", [10000.0])
    flips = select_flips(d_head, core["deltas"], bases, tol=tol, per_base=per_base)
    cells = [{"name": f.name, "group": f"flip {f.direction}", "objective": core["objective"], "model": core.get("model", {}),
              **({"train": core["train"]} if "train" in core else {}), "deltas": [f.delta], "bases": [f.base],
              "distractor_offsets": list(f.offsets)} for f in flips]
    sweep = {"name": "routing_flips", "family": "routing", "world": routing_sweep.get("world", {}),
             "train": routing_sweep.get("train", {}), "seeds": routing_sweep["seeds"],
             **({"stack_size": routing_sweep["stack_size"]} if "stack_size" in routing_sweep else {}), "cells": cells}
    RoutingSweepSpec.from_dict(sweep)  # the engine accepts it
    records = []
    for f in flips:
        now, flip = layout_verdict(d_head, f.delta, f.base), layout_verdict(d_head, f.delta, f.base, f.offsets)
        records.append({
            "cell": f.name, "direction": f.direction, "delta": f.delta, "base": f.base, "d_head": d_head,
            "distractor_offsets": list(f.offsets), "default_offsets": distractor_offsets(f.delta),
            "within_default_range": max(f.offsets) <= 2 * f.delta + 1,
            "predicted_b_wins": flip["b_wins"], "predicted_share": _round(flip["share"]),
            "default_b_wins": now["b_wins"], "default_share": _round(now["share"]),
            "kernel_b": _round(flip["kernel_b"]),
            "kernel_distractors": {str(o): _round(k) for o, k in flip["kernel_distractors"].items()},
            **{key: _round(flip[key]) for key in ("margin", "margin_norm", "pair_margin_min", "pair_margin_max",
                                                 "pair_margin_min_norm", "pair_margin_max_norm")},
            "default_margin": _round(now["margin"]), "default_margin_norm": _round(now["margin_norm"]),
            "nearest_key_share": _round(flip["nearest_key_share"]), "nearest_key_b_wins": flip["nearest_key_share"] > 0.5,
        })
    predictions = {
        "name": "routing_flips", "sweep": "data/routing_flips_sweep.json", "table": "data/routing_flips.jsonl",
        "train": "revlens sweep data/routing_flips_sweep.json --out data/routing_flips.jsonl",
        "seeds": routing_sweep["seeds"],
        "kernel": ("K(s) = sum_m cos(theta_m s), theta_m = base^(-2m/d_head), m = 0 .. d_head/2 - 1. A route trained at +delta "
                   "is the matched filter g(r) = K(r - delta), r = key position - mask position; in the reverse prompt B "
                   "(r = -delta) scores K(2 delta) and a distractor at r = -o scores K(delta + o)."),
        "selection": {"d_head": d_head, "deltas": core["deltas"], "bases": bases, "n_ctx": N_CTX, "margin_tol": tol,
                      "fails_today_share": FAILS_TODAY, "succeeds_today_share": SUCCEEDS_TODAY, "per_base": per_base,
                      "rule": ("revlens.routing_flips.select_flips: geometry only, no trained weights, no measured "
                               "accuracy. Provenance: its preference for offsets inside 1 .. 2 delta + 1 was chosen after "
                               "seeing that models trained on the default layout follow the kernel's single-distractor "
                               "verdict less often beyond that range, where they never saw a distractor")},
        "rule": RULE, "cells": records,
    }
    return sweep, predictions


def _round(x: float) -> float:
    return round(float(x), 6)


def write_flip_files(sweep_path: str | Path = SWEEP_FILE, predictions_path: str | Path = PREDICTIONS_FILE,
                     routing_sweep_path: str | Path = ROUTING_SWEEP_FILE) -> tuple[Path, Path]:
    """Write the flip sweep file and the prediction file (refused when either is there: registered once)."""
    paths = Path(sweep_path), Path(predictions_path)
    for path in paths:
        if path.exists():
            raise FileExistsError(f"{path} exists: the flips were registered already; they are not rewritten")
    sweep, predictions = flip_files(load_json(routing_sweep_path))
    write_json_atomic(paths[0], sweep)
    write_json_atomic(paths[1], predictions)
    return paths


def read_predictions(path: str | Path = PREDICTIONS_FILE) -> dict[str, Any]:
    """The registered flips, refused if their rule is not the one :func:`check_flips` applies."""
    record = load_json(Path(path))
    if not isinstance(record, dict) or record.get("rule") != RULE or not isinstance(record.get("cells"), list):
        raise ValueError(f"{path}: its 'rule' is {record.get('rule') if isinstance(record, dict) else record!r}, but "
                         f"this library checks {RULE!r}")
    return record


def check_flips(record: dict[str, Any], rows: Sequence[dict[str, Any]]):
    """Judge every registered cell against trained sweep rows (``revlens.sweep.read_rows`` of the flip table)
    by the record's rule: one row per cell with its seeds' mean reverse and in-place accuracy, the measured
    and predicted verdicts and ``status`` (``hit``, ``miss`` or ``void``). A cell with a seed missing, or
    rows trained on other distractor offsets, is an error."""
    import pandas as pd

    rule, out = record["rule"], []
    for cell in record["cells"]:
        mine = [r for r in rows if r.get("cell") == cell["cell"] and r.get("delta") == cell["delta"]
                and r.get("base") == cell["base"]]
        missing = sorted(set(record["seeds"]) - {r["seed"] for r in mine})
        if missing:
            raise ValueError(f"cell {cell['cell']!r}: no rows for seeds {missing}; train them before judging")
        if any(r.get("distractor_offsets") != cell["distractor_offsets"] for r in mine):
            raise ValueError(f"cell {cell['cell']!r}: rows trained on other distractor offsets than {cell['distractor_offsets']}")
        mine = [r for r in mine if r["seed"] in record["seeds"]]
        reverse = sum(r[rule["statistic"]] for r in mine) / len(mine)
        inplace = sum(r["inplace_acc"] for r in mine) / len(mine)
        measured = reverse > rule["b_wins_above"]
        status = "void" if inplace < rule["void_if_inplace_acc_below"] else "hit" if measured == cell["predicted_b_wins"] else "miss"
        out.append({"cell": cell["cell"], "direction": cell["direction"], "delta": cell["delta"], "base": cell["base"],
                    "seeds": len(mine), "reverse_acc": reverse, "inplace_acc": inplace, "measured_b_wins": measured,
                    "predicted_b_wins": cell["predicted_b_wins"], "default_b_wins": cell["default_b_wins"],
                    "margin_norm": cell["margin_norm"], "status": status})
    return pd.DataFrame(out)


def flip_report(record: dict[str, Any], rows: Sequence[dict[str, Any]], default_rows: Any) -> "pd.DataFrame":
    """:func:`check_flips` beside what a reader needs to judge each registered cell, one row per cell.

    ``default_rows``: rows of the routing table (``data/routing.jsonl``, a DataFrame or dicts); its ``core``
    cell at the same delta and base is the default layout, trained before the flips were registered. Adds
    ``offsets`` (the flip layout), ``default_b_wins`` (the filter's default-layout verdict, from the file),
    ``default_reverse`` / ``default_measured_b_wins`` (its measured mean over seeds, judged by the file's rule),
    ``reverse_min`` / ``reverse_max`` over the flip cell's seeds, ``nearest_key_b_wins`` (the nearest-key
    baseline's verdict on the flip layout, from the file) and ``nearest_key_status`` (``hit`` / ``miss`` by
    the same rule), ``default_nearest_key_b_wins`` (the baseline on the default layout) and ``pair_margin_norm``
    (the smallest margin, over distractor pairs, by which the filter's verdict holds; units of d_head / 2)."""
    import pandas as pd

    table = check_flips(record, rows)
    default = [dict(r) for r in (default_rows.to_dict("records") if hasattr(default_rows, "to_dict") else default_rows)]
    above = record["rule"]["b_wins_above"]
    extra = []
    statistic = record["rule"]["statistic"]
    for cell in record["cells"]:
        key = (cell["delta"], cell["base"])
        mine = [r[statistic] for r in rows if r.get("cell") == cell["cell"] and (r.get("delta"), r.get("base")) == key
                and r["seed"] in record["seeds"]]
        core = [r[statistic] for r in default if r.get("cell") == "core" and (r.get("delta"), r.get("base")) == key]
        if not core:
            raise ValueError(f"cell {cell['cell']!r}: the routing table has no core row at delta {cell['delta']}, base {cell['base']}")
        default_reverse = sum(core) / len(core)
        extra.append({"offsets": list(cell["distractor_offsets"]), "default_reverse": default_reverse,
                      "default_measured_b_wins": default_reverse > above, "reverse_min": min(mine), "reverse_max": max(mine),
                      "nearest_key_b_wins": cell["nearest_key_b_wins"],
                      "default_nearest_key_b_wins": nearest_key_share(cell["delta"]) > above,
                      "pair_margin_norm": cell["pair_margin_min_norm"] if cell["predicted_b_wins"] else -cell["pair_margin_max_norm"]})
    table = pd.concat([table, pd.DataFrame(extra)], axis=1)
    table["nearest_key_status"] = [
        "void" if s == "void" else "hit" if nk == m else "miss"
        for s, nk, m in zip(table.status, table.nearest_key_b_wins, table.measured_b_wins)]
    return table


def flip_scores(report: "pd.DataFrame") -> dict[str, int]:
    """Counts over a :func:`flip_report`: ``hits`` of the filter and ``nearest_key_hits`` of the baseline (of
    ``cells``); ``disagree``: cells where the two predict different verdicts, and each one's hits there;
    ``layout_flips``: cells whose measured verdict differs between the default and the flip layout (at the
    same delta and base, so a rule that reads delta and the base but not the layout is wrong in one of the two
    layouts of each: it can be right in at most ``layout_blind_best`` of the ``2 * cells`` (cell, layout)
    pairs); ``filter_both`` / ``nearest_key_both``: how many of those pairs each gets right (the default
    layouts' measurements were known when the flips were chosen; only the flip layouts are pre-registered)."""
    n = len(report)
    disagree = report.nearest_key_b_wins != report.predicted_b_wins
    layout_flips = int((report.default_measured_b_wins != report.measured_b_wins).sum())
    hits, nk_hits = report.status == "hit", report.nearest_key_status == "hit"
    return {"cells": n, "hits": int(hits.sum()), "nearest_key_hits": int(nk_hits.sum()), "disagree": int(disagree.sum()),
            "hits_where_disagree": int((hits & disagree).sum()), "nearest_key_hits_where_disagree": int((nk_hits & disagree).sum()),
            "layout_flips": layout_flips, "layout_blind_best": 2 * n - layout_flips,
            "filter_both": int(hits.sum() + (report.default_b_wins == report.default_measured_b_wins).sum()),
            "nearest_key_both": int(nk_hits.sum() + (report.default_nearest_key_b_wins == report.default_measured_b_wins).sum())}


def registration_commit(path: str | Path = PREDICTIONS_FILE) -> str:
    """The commit that added ``path`` (default: the prediction file); see :func:`revlens.provenance.registration_commit`."""
    return provenance.registration_commit(path)


def registered_before(first: str | Path = PREDICTIONS_FILE, second: str | Path = TABLE_FILE) -> bool | None:
    """Whether the predictions were committed before the results; see :func:`revlens.provenance.registered_before`."""
    return provenance.registered_before(first, second)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m revlens.routing_flips``: register the flips (write both files once) and print the cells."""
    parser = argparse.ArgumentParser(prog="python -m revlens.routing_flips", description=main.__doc__)
    parser.add_argument("--sweep", default=str(SWEEP_FILE), help="flip sweep file to write")
    parser.add_argument("--predictions", default=str(PREDICTIONS_FILE), help="prediction file to write")
    parser.add_argument("--routing-sweep", default=str(ROUTING_SWEEP_FILE), help="routing sweep file whose core recipe to copy")
    args = parser.parse_args(argv)
    sweep_path, predictions_path = write_flip_files(args.sweep, args.predictions, args.routing_sweep)
    for cell in read_predictions(predictions_path)["cells"]:
        print(f"{cell['cell']:>22}  offsets {cell['distractor_offsets']}  predicted B wins {cell['predicted_b_wins']} "
              f"(default {cell['default_b_wins']}), margin {cell['margin_norm']:+.3f}")
    print(f"written {sweep_path} and {predictions_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
