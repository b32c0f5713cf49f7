"""Per-offset route preference: the kernel's single-distractor verdicts, the single-distractor evaluator and its
agreement share, and the weights-only read of a trained model's route (which must not touch evaluation data)."""

import math

import numpy as np
import pytest
import torch

from revlens.config import EncoderConfig
from revlens.evaluation import answer_metrics, evaluate
from revlens.model import ToyTransformer
from revlens.routing import N_CTX, RoutingWorld, distractor_offsets, matched_filter_reverse_accuracy
from revlens.routing_offsets import (NEAR_ZERO_MARGIN, mirrored_filter_b_wins, mirrored_filter_margin, offset_agreement,
                                     probe_offset_rows, read_route, single_distractor_metrics, single_distractor_offsets)
from revlens.stack import Member, train_stack
from revlens.training import TrainConfig

OFFSETS = (1, 2, 3, 4, 5, 6, 7, 9, 12, 20)
"""A few offsets inside 1 .. 2 delta + 1 (delta 2, 3) and beyond it: enough to test, cheap to evaluate."""


def kernel(s: float, d: int = 16, base: float = 1e4) -> float:
    return float(np.cos(s * base ** (-2.0 * np.arange(d // 2) / d)).sum())


@pytest.fixture(scope="module")
def trained():
    """Two small in-place-only RoPE models, delta 2 (reverse fails: K(6) > K(4)) and delta 3 (it succeeds)."""
    members = []
    for delta in (2, 3):
        world = RoutingWorld.generate(n_facts=16, delta=delta, seed=0, sentences_per_fact=8)
        members.append(Member(EncoderConfig(d_vocab=world.d_vocab, n_ctx=N_CTX, d_model=32, n_heads=2, d_head=16), world, 0))
    models = train_stack(members, TrainConfig("inplace", steps=150, batch_size=64), progress=False)
    return models, [m.world for m in members]


def test_single_distractor_verdicts_follow_the_kernel():
    # reverse: B at -delta scores K(2 delta), the distractor at -o scores K(delta + o)
    for delta, offset in [(2, 4), (2, 1), (3, 5), (8, 30)]:
        assert mirrored_filter_margin(16, delta, 1e4, offset) == pytest.approx(kernel(2 * delta) - kernel(delta + offset))
    assert not mirrored_filter_b_wins(16, 2, 1e4, 4) and mirrored_filter_b_wins(16, 3, 1e4, 5)
    # in place: B scores K(0), the maximum, so it wins at every other offset
    assert all(mirrored_filter_b_wins(16, d, b, o, "inplace") for d in (2, 5) for b in (1e2, 1e6) for o in range(1, 40) if o != d)
    # with two distractors the same verdicts make the matched filter's share
    wins = {o: mirrored_filter_b_wins(16, 4, 1e4, o) for o in distractor_offsets(4)}
    pairs = [(a, b) for a in wins for b in wins if a < b]
    assert matched_filter_reverse_accuracy(16, 4, 1e4) == pytest.approx(np.mean([wins[a] and wins[b] for a, b in pairs]))
    assert single_distractor_offsets(3, 8) == [1, 2, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="other than delta=3"):
        mirrored_filter_margin(16, 3, 1e4, 3)
    with pytest.raises(ValueError, match="unknown query"):
        mirrored_filter_margin(16, 3, 1e4, 2, "forward")


def test_evaluator_measures_accuracy_margin_and_attention_per_offset(trained):
    models, worlds = trained
    rows = single_distractor_metrics(models, worlds, offsets=OFFSETS)
    assert len(rows) == 2 * 2 * (len(OFFSETS) - 1)  # 2 models x 2 queries, each model skipping its own delta
    row = next(r for r in rows if (r["model"], r["query"], r["offset"]) == (1, "reverse", 5))
    es, arranged, decoys = worlds[1].single_distractor_prompts("reverse", 5)
    logits, cache = models[1].run_with_cache(es.prompts, positions=es.positions, names_filter="blocks.0.attn.hook_pattern")
    logits, pattern = logits[:, es.mask_pos], cache["blocks.0.attn.hook_pattern"][:, :, es.mask_pos]
    batch = torch.arange(len(es.prompts))
    assert row["acc"] == answer_metrics(logits, es)["acc"] and row["margin"] == pytest.approx(answer_metrics(logits, es)["margin"])
    assert row["attn_b"] == pytest.approx(pattern[batch, :, arranged.b_index].mean().item())
    assert row["attn_d"] == pytest.approx(pattern[batch, :, arranged.d_index[:, 0]].mean().item())
    gap = logits.gather(1, es.answers[:, None])[:, 0] - logits.gather(1, decoys)[:, 0]
    assert row["logit_gap"] == pytest.approx(gap.mean().item())
    assert (row["delta"], row["base"], row["d_head"]) == (3, 1e4, 16)
    # the route learned in place: B beats one distractor at every trained-range offset of the in-place query
    assert all(r["acc"] > 0.9 for r in rows if r["query"] == "inplace" and r["offset"] <= 2 * r["delta"] + 1)
    # delta 2: the distractor at -4 (K(6) > K(4)) takes the reverse query; delta 3 at -5 does not
    assert next(r for r in rows if (r["model"], r["query"], r["offset"]) == (0, "reverse", 4))["acc"] < 0.5 < row["acc"]
    with pytest.raises(ValueError, match="one world per model"):
        single_distractor_metrics(models, worlds[:1])


def test_agreement_share_counts_cells_and_flags_near_zero_margins(trained):
    models, worlds = trained
    rows = single_distractor_metrics(models, worlds, offsets=OFFSETS, queries=("reverse",))
    out = offset_agreement(rows)
    assert out["n_cells"] == len(rows) == len(out["cells"])  # one model per (delta, offset) cell here
    for cell in out["cells"]:
        assert cell["predicted_b_wins"] == mirrored_filter_b_wins(16, cell["delta"], 1e4, cell["offset"])
        assert cell["near_zero"] == (abs(cell["kernel_margin"]) / 8 < NEAR_ZERO_MARGIN)
    assert out["agreement"] == pytest.approx(np.mean([c["agree"] for c in out["cells"]]))
    inside = [c for c in out["cells"] if c["offset"] <= 2 * c["delta"] + 1 and not c["near_zero"]]
    assert np.mean([c["agree"] for c in inside]) >= 0.8  # the trained range follows the kernel
    # synthetic rows: two models of one cell average; a near-zero cell is left out of agreement_clear
    synthetic = [{"d_head": 16, "base": 1e4, "delta": 2, "query": "reverse", "offset": 4, "acc": a} for a in (0.2, 0.4)]
    synthetic += [{"d_head": 16, "base": 1e4, "delta": 2, "query": "reverse", "offset": 1, "acc": 0.9}]
    small = offset_agreement(synthetic, near_zero=0.05)
    assert small["n_cells"] == 2 and small["cells"][0]["acc"] == pytest.approx(0.3) and small["cells"][0]["n_models"] == 2
    assert small["cells"][0]["agree"]  # K(6) > K(4): the distractor wins, as measured
    assert small["cells"][1]["near_zero"] and small["n_near_zero"] == 1  # K(4) - K(3) is 0.004 of d / 2
    assert small["agreement_clear"] == 1.0
    # the base-blind baselines: cos(2 delta) vs cos(delta + o) (theta = 1 only), and "the nearer key wins"
    assert [c["theta1_b_wins"] for c in small["cells"]] == [math.cos(4) > math.cos(6), math.cos(4) > math.cos(3)]
    assert [c["nearest_b_wins"] for c in small["cells"]] == [True, False]
    assert small["agreement_nearest"] == 0.0 and all(c["inside"] for c in small["cells"])
    with pytest.raises(ValueError, match="no rows"):
        offset_agreement([])


def test_probe_rows_unfold_to_one_row_per_model_query_and_offset():
    row = {"delta": 2, "base": 100.0, "d_head": 16, "seed": 3}
    for query in ("inplace", "reverse"):
        row |= {f"{query}_offsets": [1, 3], f"{query}_single_acc": [0.9, 0.1], f"{query}_single_logit_gap": [2.0, -1.0],
                f"{query}_weights_b_wins": [True, False]}
    rows = probe_offset_rows([row, {**row, "seed": 4}])
    assert len(rows) == 8 and {r["model"] for r in rows} == {0, 1}
    assert rows[0] == {"model": 0, "delta": 2, "base": 100.0, "d_head": 16, "seed": 3, "query": "inplace", "offset": 1,
                       "acc": 0.9, "logit_gap": 2.0, "weights_b_wins": True}
    assert offset_agreement(rows)["n_cells"] == 4


def test_weight_read_scores_are_the_models_own():
    """f_h(r) = q_h . R(r) kbar_h / sqrt(d) equals the mean over the B alphabet of the pre-softmax score the
    model computes for a mask at position p and a B at p + r (either sign of r), for any weights."""
    torch.manual_seed(0)
    world = RoutingWorld.generate(n_facts=16, delta=3, seed=0)
    model = ToyTransformer(EncoderConfig(d_vocab=world.d_vocab, n_ctx=N_CTX, d_model=32, n_heads=2, d_head=16, rotary_base=100.0))
    read = read_route(model, 3, 16, offsets=(1, 5, 40))
    b = world.alphabet("B")
    for sign, query in ((-1, "reverse"), (1, "inplace")):
        read = read_route(model, 3, 16, offsets=(1, 5, 40), query=query)
        for distance, expected in zip((3, 1, 5, 40), torch.cat([read.f_b[:, None], read.f_d], 1).T):
            mask_at = 45 if sign < 0 else 2
            tokens = torch.stack([torch.zeros_like(b), b], 1)
            positions = torch.tensor([mask_at, mask_at + sign * distance]).expand(len(b), 2)
            _, cache = model.run_with_cache(tokens, positions=positions, names_filter="blocks.0.attn.hook_attn_scores")
            scores = cache["blocks.0.attn.hook_attn_scores"]
            torch.testing.assert_close(scores[:, :, 0, 1].mean(0), expected, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(scores[0, :, 0, 0], read.self_score, rtol=1e-4, atol=1e-5)
    assert read.head_margin.shape == (2,) and read.single_b_wins.shape == (3,) and 0 <= read.predicted_acc <= 1
    for bad in (dict(positional="alibi"), dict(untied_positions=("q", "k")), dict(attention_dir="causal"), dict(n_layers=2)):
        other = ToyTransformer(EncoderConfig(d_vocab=world.d_vocab, n_ctx=N_CTX, d_model=32, n_heads=2, **bad))
        with pytest.raises(ValueError, match="read_route reads"):
            read_route(other, 3, 16)
    with pytest.raises(ValueError, match="distractor offsets other than delta=3"):
        read_route(model, 3, 16, offsets=(3, 5))
    with pytest.raises(ValueError, match="do not fit the model"):
        read_route(model, 3, 16, offsets=(5, 70))


def test_weight_read_predicts_the_reverse_query_without_reading_evaluation_data(trained, monkeypatch):
    """``read_route`` takes a model and geometry (delta, alphabet size, offsets) and runs no prompt: with every
    way to build or score a prompt disabled it still predicts; the prediction then matches the measurement."""
    import revlens.evaluation
    import revlens.routing.measures

    models, worlds = trained

    def refuse(*args, **kwargs):
        raise AssertionError("read_route touched a prompt or an evaluation")

    measured = [evaluate(m, w, "inplace")["reverse_acc"] for m, w in zip(models, worlds)]
    single = single_distractor_metrics(models, worlds, offsets=OFFSETS, queries=("reverse",))
    with monkeypatch.context() as patch:
        for owner, name in [(ToyTransformer, "forward"), (ToyTransformer, "run_with_cache"), (ToyTransformer, "run_with_hooks"),
                            (RoutingWorld, "eval_prompts"), (RoutingWorld, "single_distractor_prompts"),
                            (RoutingWorld, "training_data"), (revlens.evaluation, "answer_metrics"),
                            (revlens.evaluation, "evaluate"), (revlens.routing.measures, "mask_row")]:
            patch.setattr(owner, name, refuse)
        reads = [read_route(m, w.delta, w.n_facts) for m, w in zip(models, worlds)]
        per_offset = [read_route(m, w.delta, w.n_facts, offsets=[o for o in OFFSETS if o != w.delta]) for m, w in zip(models, worlds)]
    for read, acc in zip(reads, measured):
        assert read.b_wins == (acc > 0.5) and abs(read.predicted_acc - acc) < 0.25
    assert not reads[0].b_wins and reads[1].b_wins and (reads[1].head_margin > 0).all()
    for i, read in enumerate(per_offset):
        accs = [r["acc"] for r in single if r["model"] == i]
        assert np.mean([(acc > 0.5) == bool(win) for acc, win in zip(accs, read.single_b_wins)]) >= 0.9
    assert not math.isnan(reads[0].gain.sum().item()) and (reads[0].gain > 0).all()  # both heads carry B -> A


def test_probe_rows_read_the_weights_before_anything_is_measured(trained, monkeypatch):
    """Each probe row is read from the weights first: every weight reading happens before the first prompt is
    scored. The row's per-offset lists line up, and its measured numbers are the evaluator's."""
    import revlens.evaluation
    import revlens.routing_offsets as offsets_module
    from revlens.routing_offsets import probe_rows

    models, worlds = trained
    calls = []
    real_read, real_metrics = offsets_module.read_route, offsets_module.single_distractor_metrics
    monkeypatch.setattr(offsets_module, "read_route", lambda *a, **k: calls.append("read") or real_read(*a, **k))
    monkeypatch.setattr(offsets_module, "single_distractor_metrics",
                        lambda *a, **k: calls.append("measure") or real_metrics(*a, **k))
    real_evaluate = revlens.evaluation.evaluate
    monkeypatch.setattr(revlens.evaluation, "evaluate", lambda *a, **k: calls.append("measure") or real_evaluate(*a, **k))
    row = probe_rows(models[0], worlds[0], "inplace")
    assert calls == ["read"] * 4 + ["measure"] * 3
    offsets = single_distractor_offsets(2, N_CTX)
    for query in ("reverse", "inplace"):
        assert row[f"{query}_offsets"] == offsets
        assert len(row[f"{query}_weights_b_wins"]) == len(row[f"{query}_single_acc"]) == len(offsets)
    assert row["reverse_acc"] == round(evaluate(models[0], worlds[0], "inplace")["reverse_acc"], 6)
    single = single_distractor_metrics(models[:1], worlds[:1], offsets=[1, 5], queries=("reverse",))
    assert [row["reverse_single_acc"][offsets.index(o)] for o in (1, 5)] == [round(r["acc"], 6) for r in single]
    assert not row["reverse_weights_acc"] > 0.5 and row["inplace_weights_acc"] == 1.0  # delta 2: reverse fails


def test_the_shipped_probe_sweep_is_the_core_cell_with_the_probe():
    """The probe sweep file is what the library writes from the routing sweep file: the core cell's models, and
    a config hash that differs from the core row's only by the probe (a table of one is never read as the other)."""
    import json
    from pathlib import Path

    from revlens.routing.sweep import RoutingSweepSpec
    from revlens.routing_offsets import SWEEP_FILE, probe_sweep

    root = Path(__file__).parents[1]
    routing = json.loads((root / "data" / "routing_sweep.json").read_text())
    shipped = json.loads((root / SWEEP_FILE).read_text())
    assert shipped == probe_sweep(routing)
    probe, plain = RoutingSweepSpec.from_dict(shipped), RoutingSweepSpec.from_dict({**shipped, "probe": None, "name": "x"})
    job = probe.jobs()[0]
    assert probe.config(job) != plain.config(job)
    core = RoutingSweepSpec.from_dict(routing)
    assert plain.config(job) == core.config(next(j for j in core.jobs() if j[0].name == "core"))
    with pytest.raises(ValueError, match="probe"):
        RoutingSweepSpec.from_dict({**shipped, "probe": "heads"})


def test_deeper_models_get_no_weight_reading_and_the_deep_sweep_is_the_core_recipe():
    """A two-layer model's later queries read the prompt, so no content-free route exists: its probe row holds
    None for the reading (never a guess) and measured values for the rest; a one-layer model with an MLP is read
    (its scores exactly). The shipped deep sweep is what the library writes: the core recipe, each cell's change."""
    import json
    from pathlib import Path

    from revlens.routing_offsets import DEEP_CELLS, DEEP_SWEEP_FILE, deep_sweep, probe_rows, readable

    world = RoutingWorld.generate(n_facts=8, delta=2, seed=0, sentences_per_fact=4)
    deep = ToyTransformer(EncoderConfig(d_vocab=world.d_vocab, n_ctx=N_CTX, d_model=16, n_heads=2, d_head=8, n_layers=2))
    row = probe_rows(deep, world, "inplace")
    assert row["reverse_weights_b_wins"] is None and row["reverse_weights_acc"] is None
    assert len(row["reverse_single_acc"]) == len(row["reverse_offsets"]) == N_CTX - 2
    with pytest.raises(ValueError, match="one-layer"):
        read_route(deep, 2, 8)
    assert readable(EncoderConfig(d_vocab=9, n_ctx=N_CTX, attn_only=False)) and not readable(deep.cfg)
    root = Path(__file__).parents[1]
    routing = json.loads((root / "data" / "routing_sweep.json").read_text())
    shipped = json.loads((root / DEEP_SWEEP_FILE).read_text())
    assert shipped == deep_sweep(routing) and [c["name"] for c in shipped["cells"]] == [n for n, _ in DEEP_CELLS]
    core = next(c for c in routing["cells"] if c["name"] == "core")
    assert all(c["objective"] == core["objective"] and c["bases"] == core["bases"] for c in shipped["cells"])


def test_dominant_period_finds_the_strongest_oscillation():
    from revlens.routing_offsets import dominant_period

    offsets = np.arange(60)
    assert dominant_period((np.cos(offsets * 1.0) > 0).astype(float)) == pytest.approx(2 * math.pi, rel=0.05)
    assert dominant_period(np.sin(offsets * 2 * math.pi / 12)) == pytest.approx(12.0)
    assert math.isnan(dominant_period([1.0] * 10)) and math.isnan(dominant_period([0, 1, 0]))
