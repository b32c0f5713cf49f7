"""The routing sweep: cells of objectives and model changes at several offsets, RoPE bases and seeds.

A sweep file (``"family": "routing"``, :class:`RoutingSweepSpec`) trains one stack per chunk of a cell
(:func:`train_rows`) into a resumable table (:func:`run_routing_sweep`); each row
keeps :data:`ROW_METRICS`. ``revlens sweep`` dispatches on the family.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from revlens.config import EncoderConfig, check_choice, check_file_name, check_finite, check_int, check_seeds
from revlens.objectives import OBJECTIVES
from revlens.routing.measures import HELD_OUT, HELD_OUT_METRICS, N_CTX, routing_metrics
from revlens.routing.world import LAYOUTS, N_DISTRACTORS, ROUTING_EVAL_SETS, RoutingWorld
from revlens.sweep import Planned, config_hash
from revlens.training import TrainConfig, init_noise


ROW_METRICS: tuple[str, ...] = (
    tuple(f"{s}_{m}" for s in (*ROUTING_EVAL_SETS, "forward") for m in ("acc", "acc_in_type", "logp", "margin", "acc_uniform", "acc_in_type_uniform"))
    + tuple(f"{s}_{m}" for s in ROUTING_EVAL_SETS for m in ("attn_b", "attn_d", "attn_b_top"))
    + ("score_corr",)
    + tuple(f"{m}_{suffix}" for suffix, _ in HELD_OUT for m in HELD_OUT_METRICS)
)
"""The metrics each sweep row keeps (see :func:`routing_metrics`; ``forward_*`` only with fillers)."""
PROBES: tuple[str, ...] = ("offsets",)
"""What a sweep file's ``"probe"`` may ask each model for instead of :data:`ROW_METRICS`."""


@dataclass(frozen=True)
class RoutingCell:
    """One arm of the routing sweep: an objective and model changes, at several offsets and RoPE bases."""

    name: str
    objective: str
    model: dict[str, Any]
    deltas: tuple[int, ...]
    bases: tuple[float, ...] = (10000.0,)
    group: str = ""
    layout: str = "gaps"
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Changes to the sweep's training settings for this cell (e.g. more steps)."""
    shift_positions: bool = False
    """Train with a random shift added to each sentence's position ids (``train_stack(shift_positions=True)``)."""
    stack_size: int | None = None
    """Models per stack for this cell (default: the sweep's). Untied projections gather one matrix per
    token, which trains faster one model at a time than vmapped (``bench/routing_stack.py --cell``)."""
    distractor_offsets: tuple[int, ...] | None = None
    """The offsets distractors may take, in training and evaluation (:class:`RoutingWorld`); ``None``, the
    default, keeps ``1 .. 2 delta + 1`` without delta and leaves the cell's config hash what it was."""

    def model_cfg(self, world: RoutingWorld, base: float) -> EncoderConfig:
        from revlens.experiments import BASE_MODEL

        fields = {**BASE_MODEL, "attention_dir": "bidirectional", **self.model, "rotary_base": float(base)}
        return EncoderConfig(d_vocab=world.d_vocab, n_ctx=N_CTX, **fields)


def _positive_ints(label: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(type(v) is int and v >= 1 for v in value):
        raise ValueError(f"{label} must be a non-empty list of positive integers, got {value!r}")
    return tuple(value)


def _cell_from_dict(index: int, entry: Any) -> RoutingCell:
    """One entry of a routing sweep file's ``cells`` list, every field checked, errors naming the cell."""
    if not isinstance(entry, dict):
        raise ValueError(f"cells[{index}] must be a JSON object, got {entry!r}")
    label = f"cell {index} ({entry.get('name')!r})"
    extra = set(entry) - {"name", "objective", "model", "deltas", "bases", "group", "layout", "train", "stack_size",
                          "shift_positions", "distractor_offsets"}
    if extra or not {"name", "objective", "deltas"} <= set(entry):
        raise ValueError(f"{label} needs name, objective, deltas; unknown keys {sorted(extra)}")
    for key in ("name", "objective"):
        if not isinstance(entry[key], str) or not entry[key]:
            raise ValueError(f"{label}: {key!r} must be a non-empty string, got {entry[key]!r}")
    check_choice("objective", entry["objective"], OBJECTIVES)
    for key in ("model", "train"):
        if not isinstance(entry.get(key, {}), dict):
            raise ValueError(f"{label}: {key!r} must be a JSON object, got {entry[key]!r}")
    if not isinstance(entry.get("group", ""), str):
        raise ValueError(f"{label}: 'group' must be a string, got {entry['group']!r}")
    if not isinstance(entry.get("shift_positions", False), bool):
        raise ValueError(f"{label}: 'shift_positions' must be true or false, got {entry['shift_positions']!r}")
    bases = entry.get("bases", [10000.0])
    if not isinstance(bases, list) or not bases:
        raise ValueError(f"{label}: 'bases' must be a non-empty list of RoPE bases, got {bases!r}")
    for base in bases:
        check_finite(f"{label}: RoPE base", base, 1, strict=True)
    layout = entry.get("layout", "gaps")
    if layout not in LAYOUTS:
        raise ValueError(f"{label}: unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    stack_size = entry.get("stack_size")
    if stack_size is not None:
        check_int(f"{label}: stack_size", stack_size, 1)
    offsets = entry.get("distractor_offsets")
    if offsets is not None:
        offsets = _positive_ints(f"{label}: 'distractor_offsets'", offsets)
    return RoutingCell(entry["name"], entry["objective"], dict(entry.get("model", {})),
                       _positive_ints(f"{label}: 'deltas'", entry["deltas"]), tuple(float(b) for b in bases),
                       entry.get("group", ""), layout, dict(entry.get("train", {})), entry.get("shift_positions", False),
                       stack_size, offsets)


Job = tuple[RoutingCell, int, float, int]
"""(cell, delta, RoPE base, seed): one model of a routing sweep."""


@dataclass(frozen=True)
class RoutingSweepSpec:
    """A routing sweep file (``"family": "routing"``): world size, training settings, seeds, cells.

    Seed s trains model seed s on the world with seed s (own facts, own distractor draws). A row per
    model, keyed by (cell, delta, base, seed); :func:`revlens.sweep.run_table` runs it (provenance,
    stale-row refusal, ``--redo``, atomic writes, torn-line recovery), like an ablation sweep."""

    name: str
    world: dict[str, Any]
    train: TrainConfig
    seeds: tuple[int, ...]
    cells: tuple[RoutingCell, ...]
    stack_size: int = 50
    probe: str | None = None
    """``None``: each row keeps :data:`ROW_METRICS`; ``"offsets"``: each row keeps instead the model's per-offset
    preference, read from its weights and then measured (:func:`revlens.routing_offsets.probe_rows`)."""
    key_fields: ClassVar[tuple[str, ...]] = ("cell", "delta", "base", "seed")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RoutingSweepSpec":
        if not isinstance(data, dict):
            raise ValueError(f"a routing sweep file holds a JSON object, got {type(data).__name__}")
        allowed = {"name", "family", "world", "train", "seeds", "cells", "stack_size", "probe"}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"routing sweep file has unknown keys {sorted(unknown)}")
        for key in ("world", "train"):
            if not isinstance(data.get(key, {}), dict):
                raise ValueError(f"routing sweep file: {key!r} must be a JSON object, got {data[key]!r}")
        world_keys = set(data.get("world", {})) - {"n_facts", "sentences_per_fact"}
        if world_keys:
            raise ValueError(f"routing sweep file: unknown 'world' keys {sorted(world_keys)}; expected n_facts, "
                             "sentences_per_fact (each cell sets the offset, seed and layout)")
        if not isinstance(data.get("cells"), list) or not data["cells"]:
            raise ValueError(f"routing sweep file: 'cells' must be a non-empty list of cells, got {data.get('cells')!r}")
        cells = [_cell_from_dict(i, entry) for i, entry in enumerate(data["cells"])]
        if len({c.name for c in cells}) != len(cells):
            raise ValueError("a routing sweep needs cells with unique names")
        for cell in cells:
            if max(cell.deltas) * 2 + 2 > N_CTX:
                raise ValueError(f"cell {cell.name!r}: delta {max(cell.deltas)} needs more than n_ctx={N_CTX} position ids")
            if cell.distractor_offsets and max(cell.distractor_offsets) >= N_CTX:
                raise ValueError(f"cell {cell.name!r}: distractor offset {max(cell.distractor_offsets)} needs more than "
                                 f"n_ctx={N_CTX} position ids")
            if (cell.objective == "arm") != (cell.model.get("attention_dir") == "causal"):
                raise ValueError(f"cell {cell.name!r}: the next-token objective 'arm' goes with a causal model "
                                 "(\"model\": {\"attention_dir\": \"causal\"}) and only with it")
            if cell.objective == "arm" and cell.layout != "fillers":
                raise ValueError(f"cell {cell.name!r}: the next-token objective 'arm' needs \"layout\": \"fillers\" "
                                 "(text in position order); with gaps the next sequence index is not the next position")
        try:
            train = TrainConfig.from_dict({"log_every": data.get("train", {}).get("steps", 2000), **data.get("train", {})})
        except (TypeError, ValueError) as err:
            raise ValueError(f"routing sweep file: bad 'train': {err}") from None
        stack_size = data.get("stack_size", 50)
        check_int("stack_size", stack_size, 1)
        probe = data.get("probe")
        if probe is not None:
            check_choice("probe", probe, PROBES)
        spec = cls(check_file_name("routing sweep name", data.get("name")), dict(data.get("world", {})), train,
                   check_seeds(data.get("seeds")), tuple(cells), stack_size, probe)
        for cell in cells:  # a bad override fails now, not after the other cells have trained
            if "objective" in cell.train:
                raise ValueError(f"cell {cell.name!r}: set the objective with the cell's 'objective', not in its 'train'")
            try:
                spec.train_for(cell)
            except (TypeError, ValueError) as err:
                raise ValueError(f"cell {cell.name!r}: bad 'train' override: {err}") from None
            try:
                world = spec.world_for(cell.deltas[0], spec.seeds[0], cell.layout, cell.distractor_offsets)
                cell.model_cfg(world, cell.bases[0])
            except (TypeError, ValueError) as err:
                raise ValueError(f"cell {cell.name!r}: bad 'model' override or world: {err}") from None
            if cell.distractor_offsets is not None:  # a layout must hold at every offset of the cell
                try:
                    for delta in cell.deltas:
                        spec.world_for(delta, spec.seeds[0], cell.layout, cell.distractor_offsets)
                except ValueError as err:
                    raise ValueError(f"cell {cell.name!r}: bad 'distractor_offsets': {err}") from None
        return spec

    def jobs(self) -> list[Job]:
        """Every (cell, delta, base, seed) in file order."""
        return [(c, d, b, s) for c in self.cells for d in c.deltas for b in c.bases for s in self.seeds]

    def world_for(self, delta: int, seed: int, layout: str = "gaps",
                  distractor_offsets: Sequence[int] | None = None) -> RoutingWorld:
        return RoutingWorld.generate(delta=delta, seed=seed, layout=layout, distractor_offsets=distractor_offsets,
                                     **self.world)

    def train_for(self, cell: RoutingCell) -> TrainConfig:
        """The file's training settings with the cell's objective (the file's own ``train`` has none) and
        the cell's own changes."""
        return dataclasses.replace(self.train, objective=cell.objective, **cell.train)

    # ---- the sweep engine's plan (revlens.sweep.SweepPlan) ----
    def config(self, job: Job) -> str:
        """Hash of what determines one model's numbers: model and training configs, world, position shifts."""
        cell, delta, base, seed = job
        world = self.world_for(delta, seed, cell.layout, cell.distractor_offsets)
        layout = {} if cell.distractor_offsets is None else {"distractor_offsets": list(cell.distractor_offsets)}
        return config_hash({"model": cell.model_cfg(world, base).to_dict(), "train": self.train_for(cell).to_dict(),
                            "world": {**self.world, "delta": delta, "seed": seed, "layout": cell.layout, **layout},
                            "shift_positions": cell.shift_positions, "init_noise": init_noise(),
                            **({} if self.probe is None else {"probe": self.probe})})

    def planned(self) -> list[Planned]:
        return [Planned((job[0].name, job[1], job[2], job[3]), self.config(job), {"group": job[0].group})
                for job in self.jobs()]

    def tasks(self, todo: Sequence[Planned]) -> list[tuple[Any, ...]]:
        """Stacks of models to train together: one cell each, one sentence length (fillers: 2 delta + 2
        tokens), at most the cell's (else the file's) stack size."""
        wanted = {p.key for p in todo}
        chunks: list[list[Job]] = []
        for job in self.jobs():
            if (job[0].name, job[1], job[2], job[3]) not in wanted:
                continue
            if chunks and chunks[-1][0][0] is job[0] and len(chunks[-1]) < (job[0].stack_size or self.stack_size) and (
                job[0].layout == "gaps" or chunks[-1][0][1] == job[1]
            ):
                chunks[-1].append(job)
            else:
                chunks.append([job])
        return [(self, chunk) for chunk in chunks]

    def cost(self, task: tuple[Any, ...]) -> float:
        """Rough training cost of a stack (steps x sentence length x models), to start the longest first."""
        chunk = task[1]
        cell, delta = chunk[0][0], chunk[0][1]
        length = 2 * delta + 2 if cell.layout == "fillers" else 2 + N_DISTRACTORS
        return self.train_for(cell).steps * length * len(chunk)

    @property
    def worker(self):
        return train_rows


def train_rows(spec: RoutingSweepSpec, jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """Train ``jobs`` (all of one cell) as one stack and return their table rows (without provenance): the
    metrics of :data:`ROW_METRICS`, or with ``spec.probe`` the probe's rows."""
    from revlens.stack import Member, train_stack
    from revlens.theory import rope_score_correlation

    cell = jobs[0][0]
    members = []
    for _, delta, base, seed in jobs:
        world = spec.world_for(delta, seed, cell.layout, cell.distractor_offsets)
        members.append(Member(cell.model_cfg(world, base), world, seed))
    models = train_stack(members, spec.train_for(cell), progress=False, shift_positions=cell.shift_positions)
    if spec.probe == "offsets":
        from revlens.routing_offsets import probe_rows

        return [{"cell": cell.name, "group": cell.group, "objective": cell.objective, "d_head": member.model_cfg.d_head,
                 "delta": delta, "base": base, "seed": seed, **probe_rows(model, member.world, cell.objective)}
                for (_, delta, base, seed), member, model in zip(jobs, members, models)]
    rows = []
    for (_, delta, base, seed), member, model in zip(jobs, members, models):
        cfg = member.model_cfg
        metrics = routing_metrics(model, member.world, cell.objective)
        rotary = cfg.positional == "rotary"
        rows.append({
            "cell": cell.name, "group": cell.group, "objective": cell.objective, "positional": cfg.positional,
            "layout": cell.layout, "untied": "".join(cfg.untied_positions),
            "d_head": cfg.d_head, "delta": delta, "base": base, "seed": seed,
            "closed_form": float(rope_score_correlation(cfg.d_head, delta, base)) if rotary else None,
            "distractor_guess": 1.0 / (1 + N_DISTRACTORS), "chance": member.world.chance,
            **{k: None if math.isnan(metrics.get(k, math.nan)) else round(metrics[k], 6) for k in ROW_METRICS},
            **({} if cell.distractor_offsets is None else {"distractor_offsets": list(cell.distractor_offsets)}),
        })
    return rows


def run_routing_sweep(spec: RoutingSweepSpec, out: str | Path, progress: bool = True, jobs: int = 1,
                      redo: bool = False) -> Path:
    """Train every (cell, delta, base, seed) not yet in ``out`` (JSON lines), a stack per chunk of a cell.

    The sweep engine :func:`revlens.sweep.run_table` does the rest: rows carry provenance, a resume
    keeps only rows this file and library would write (others refused, or retrained with ``redo``),
    writes are atomic, a torn last line is dropped with a warning. ``jobs > 1`` trains that many stacks
    at once in worker processes (longest first); the table equals a one-process run's.
    """
    from revlens.sweep import run_table

    return run_table(spec, out, progress=progress, jobs=jobs, redo=redo)
