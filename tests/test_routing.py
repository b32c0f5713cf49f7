"""The routing world, the in-place-only objective, position ids, the stacked trainer and the routing sweep."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from revlens.config import EncoderConfig
from revlens.model import ToyTransformer
from revlens.objectives import make_loss_batch, sample_loss_batches
from revlens.routing import (
    A_SLOT,
    B_SLOT,
    N_CTX,
    RoutingSweepSpec,
    RoutingWorld,
    distractor_offsets,
    held_out_offsets,
    matched_filter_reverse_accuracy,
    nearest_key_share,
    routing_metrics,
    run_routing_sweep,
    train_rows,
)
from revlens.stack import Member, train_stack
from revlens.training import TrainConfig

DATA = Path(__file__).resolve().parents[1] / "data"
DELTAS = (1, 2, 3, 8, 32)


@pytest.fixture(scope="module")
def worlds():
    return [RoutingWorld.generate(n_facts=16, delta=d, seed=s, sentences_per_fact=4) for d in DELTAS for s in (0, 1)]


def test_inplace_objective_masks_only_the_a_slot():
    sentences = torch.randint(1, 30, (50, 4))
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    batch = sample_loss_batches("inplace", sentences, 64, 0, gens)
    assert (batch.inputs[..., A_SLOT] == 0).all() and (batch.inputs[..., 1:] != 0).all()
    assert (batch.weights[..., A_SLOT] == 1.0).all() and (batch.weights[..., 1:] == 0).all()
    single = make_loss_batch("inplace", sentences, 0, torch.Generator().manual_seed(0))
    assert torch.equal(single.inputs[:, 1:], sentences[:, 1:]) and (single.inputs[:, 0] == 0).all()


def test_no_training_sentence_places_a_b_before_its_a(worlds):
    for world in worlds:
        tokens, positions = world.training_data()
        a, b = torch.tensor(world.a_ids), torch.tensor(world.b_ids)
        fact = (tokens[:, A_SLOT, None] == a).int().argmax(1)
        assert torch.equal(tokens[:, B_SLOT], b[fact])  # slot 1 is the fact's own B
        assert (positions[:, A_SLOT] == 0).all() and (positions[:, B_SLOT] == world.delta).all()
        assert (positions[:, 1:] > positions[:, :1]).all()  # every B (own or distractor) after A


def test_distractors_are_other_bs_at_other_offsets(worlds):
    for world in worlds:
        b_alphabet = world.alphabet("B")
        for tokens, positions in [world.training_data(), *((es.prompts, es.positions) for es in map(world.eval_set, world.eval_set_names))]:
            distractors = tokens[:, 2:]
            assert torch.isin(distractors, b_alphabet).all()
            assert (distractors != tokens[:, 1:2]).all() and (distractors[:, 0] != distractors[:, 1]).all()
            offsets = (positions[:, 1:] - positions[:, :1]).abs()  # |offset| from the A slot / mask
            assert (offsets[:, 0] == world.delta).all()
            assert (offsets[:, 1:] != world.delta).all() and (offsets[:, 1] != offsets[:, 2]).all()
            assert int(positions.max()) < world.n_positions <= N_CTX


def test_reverse_prompt_mirrors_the_inplace_prompt():
    world = RoutingWorld.generate(n_facts=16, delta=5, seed=2)
    inplace, reverse = world.eval_set("inplace"), world.eval_set("reverse")
    assert torch.equal(inplace.prompts, reverse.prompts) and torch.equal(inplace.answers, reverse.answers)
    rel_in = inplace.positions - inplace.positions[:, :1]
    rel_rev = reverse.positions - reverse.positions[:, :1]
    assert torch.equal(rel_in, -rel_rev) and int(reverse.positions.min()) == 0
    assert (reverse.positions[:, B_SLOT] < reverse.positions[:, A_SLOT]).all()  # B before the mask


def test_world_refuses_bad_arguments():
    with pytest.raises(ValueError, match="delta"):
        RoutingWorld.generate(delta=0)
    with pytest.raises(ValueError, match="at least 3 facts"):
        RoutingWorld.generate(n_facts=2)
    with pytest.raises(ValueError, match="unknown evaluation set 'forward'"):
        RoutingWorld.generate().eval_set("forward")  # gaps: no left-to-right query
    with pytest.raises(ValueError, match="unknown layout 'spaces'"):
        RoutingWorld.generate(layout="spaces")
    with pytest.raises(ValueError, match="no filler token"):
        RoutingWorld.generate().fill_id


@pytest.mark.parametrize("positional", ["rotary", "alibi", "absolute", "none"])
def test_default_position_ids_change_nothing(positional):
    torch.manual_seed(0)
    model = ToyTransformer(EncoderConfig(d_vocab=20, n_ctx=8, d_model=16, n_heads=2, d_head=8, positional=positional))
    tokens = torch.randint(20, (5, 4))
    plain = model(tokens)
    assert torch.equal(model(tokens, positions=torch.arange(4).expand(5, 4)), plain)
    # unembedding one row instead of four may block the matmul differently: equal to float32 rounding
    torch.testing.assert_close(model(tokens, read=2), plain[:, 2:3], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="position ids must lie in"):
        model(tokens, positions=torch.full((5, 4), 8))


def test_uniform_control_comes_from_the_library_and_erases_the_offset():
    """Under a uniform pattern a one-layer RoPE model sees the in-place prompt and its mirror as the
    same bag of values (RoPE touches queries and keys only): the library's controlled metrics agree."""
    world = RoutingWorld.generate(n_facts=16, delta=3, seed=0, sentences_per_fact=8)
    cfg = EncoderConfig(d_vocab=world.d_vocab, n_ctx=N_CTX, d_model=32, n_heads=2, d_head=16)
    (model,) = train_stack([Member(cfg, world, 0)], TrainConfig("inplace", steps=150, batch_size=64), progress=False)
    out = routing_metrics(model, world, "inplace")
    assert out["inplace_acc"] == 1.0
    assert out["inplace_logp_uniform"] == pytest.approx(out["reverse_logp_uniform"], abs=1e-5)
    assert out["inplace_acc_uniform"] <= 0.5  # the route is needed: without it, a guess among B and distractors


@pytest.mark.parametrize("depth", [{}, {"n_layers": 2}, {"attn_only": False}, {"n_layers": 2, "attn_only": False}],
                         ids=["one-layer", "two-layer", "mlp", "two-layer-mlp"])
def test_stack_matches_each_member_alone_bit_for_bit(depth):
    """Members differing in offset (data), world seed (data) and RoPE base (buffers), trained as one
    vmapped stack, end with exactly the weights each gets trained alone as a plain module: in one layer, and in
    the deeper cells (two layers, MLPs) too."""
    members = []
    for delta, seed, base in [(1, 0, 100.0), (4, 1, 1e4), (16, 2, 1e6)]:
        world = RoutingWorld.generate(n_facts=16, delta=delta, seed=seed, sentences_per_fact=4)
        members.append(Member(EncoderConfig(d_vocab=world.d_vocab, n_ctx=N_CTX, d_model=32, n_heads=2, rotary_base=base,
                                            d_mlp=64, **depth), world, seed))
    for objective in ("inplace", "mdm") if not depth else ("inplace",):
        cfg = TrainConfig(objective, steps=30, batch_size=32)
        stacked = train_stack(members, cfg, progress=False)
        for member, model in zip(members, stacked):
            (alone,) = train_stack([member], cfg, progress=False)
            for (name, p), q in zip(model.named_parameters(), alone.parameters()):
                assert torch.equal(p, q), (objective, member.world.delta, name)  # bit for bit
            assert torch.equal(model.blocks[0].attn.rope_cos, alone.blocks[0].attn.rope_cos)


def test_stack_refuses_mismatched_members():
    w = RoutingWorld.generate(n_facts=16, delta=2)
    cfg = EncoderConfig(d_vocab=w.d_vocab, n_ctx=N_CTX, d_model=32, n_heads=2)
    with pytest.raises(ValueError, match="differ only in rotary_base"):
        train_stack([Member(cfg, w, 0), Member(cfg.replace(attention_dir="causal"), w, 1)], TrainConfig("inplace", steps=1), progress=False)
    with pytest.raises(ValueError, match="trains a causal model"):
        train_stack([Member(cfg, w, 0)], TrainConfig("arm", steps=1), progress=False)
    with pytest.raises(ValueError, match="trains a causal model"):
        train_stack([Member(cfg.replace(attention_dir="causal"), w, 0)], TrainConfig("inplace", steps=1), progress=False)
    with pytest.raises(ValueError, match="needs position ids 0, 1, 2"):  # gap sentences are not in position order
        train_stack([Member(cfg.replace(attention_dir="causal"), w, 0)], TrainConfig("arm", steps=1), progress=False)


def _spec(**changes):
    data = json.loads((DATA / "routing_sweep.json").read_text())
    data.update(changes)
    return data


def test_sweep_spec_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown keys"):
        RoutingSweepSpec.from_dict(_spec(colour="red"))
    bad = _spec()
    bad["cells"][0]["deltas"] = [40]
    with pytest.raises(ValueError, match="delta 40"):
        RoutingSweepSpec.from_dict(bad)
    bad = _spec()
    bad["cells"][0]["train"] = {"stepz": 3}
    with pytest.raises(ValueError, match="cell 'core': bad 'train' override"):
        RoutingSweepSpec.from_dict(bad)
    bad["cells"][0]["train"] = {"objective": "mdm"}
    with pytest.raises(ValueError, match="with the cell's 'objective'"):
        RoutingSweepSpec.from_dict(bad)
    bad["cells"][0]["train"], bad["cells"][0]["objective"] = {}, "arm"
    with pytest.raises(ValueError, match="goes with a causal model"):
        RoutingSweepSpec.from_dict(bad)
    bad["cells"][0]["model"] = {"attention_dir": "causal"}
    with pytest.raises(ValueError, match="needs \"layout\": \"fillers\""):
        RoutingSweepSpec.from_dict(bad)
    bad["cells"][0]["objective"], bad["cells"][0]["model"], bad["cells"][0]["layout"] = "inplace", {}, "spaces"
    with pytest.raises(ValueError, match="unknown layout 'spaces'"):
        RoutingSweepSpec.from_dict(bad)
    arm = next(c for c in RoutingSweepSpec.from_dict(_spec()).cells if c.name == "arm")
    assert RoutingSweepSpec.from_dict(_spec()).train_for(arm).steps == 1200 and arm.layout == "fillers"


def test_sweep_resumes_and_rejects_a_bad_table(tmp_path):
    data = _spec(seeds=[0], train={"steps": 2, "batch_size": 8})
    data["cells"] = [dict(data["cells"][0], deltas=[1, 2], bases=[1e4]), dict(data["cells"][3], deltas=[2])]
    spec = RoutingSweepSpec.from_dict(data)
    out = tmp_path / "t.jsonl"
    run_routing_sweep(spec, out, progress=False)
    lines = out.read_text().splitlines()
    assert len(lines) == 3
    run_routing_sweep(spec, out, progress=False)
    assert out.read_text().splitlines() == lines  # nothing re-run
    out.write_text(lines[0] + "\nnot json\n")
    with pytest.raises(ValueError, match="line 2"):
        run_routing_sweep(spec, out, progress=False)
    out.write_text(lines[0] + "\n" + lines[0] + "\n")
    with pytest.raises(ValueError, match=r"1 row\(s\) do not match .*core 1 10000.0 seeds \[0\]: duplicate row"):
        run_routing_sweep(spec, out, progress=False)


@pytest.mark.parametrize("cell, delta, base", [("core", 3, 1e4), ("core", 2, 1e4), ("fillers", 3, 1e4)])
@pytest.mark.slow
def test_shipped_table_rows_reproduce(cell, delta, base):
    """Retrain one shipped model alone: accuracies within 2 prompts of 64 and route weights within
    0.05 of the table (the table trained it in a stack: float round-off, not bits, differ)."""
    spec = RoutingSweepSpec.from_dict(json.loads((DATA / "routing_sweep.json").read_text()))
    rows = [json.loads(line) for line in (DATA / "routing.jsonl").read_text().splitlines()]
    (shipped,) = [r for r in rows if (r["cell"], r["delta"], r["base"], r["seed"]) == (cell, delta, base, 0)]
    (job,) = [j for j in spec.jobs() if (j[0].name, j[1], j[2], j[3]) == (cell, delta, base, 0)]
    (row,) = train_rows(spec, [job])
    for key in ("inplace_acc", "reverse_acc", "inplace_acc_uniform", "reverse_acc_in_type", "inplace_acc_dp1", "reverse_acc_dm1"):
        assert row[key] == pytest.approx(shipped[key], abs=2 / 64 + 1e-9), key
    for key in ("reverse_attn_b", "reverse_attn_d", "inplace_attn_b"):
        assert row[key] == pytest.approx(shipped[key], abs=0.05), key
    assert row["closed_form"] == pytest.approx(shipped["closed_form"], abs=1e-12)


def test_matched_filter_prediction_uses_the_closed_form():
    from revlens.routing import matched_filter_reverse_accuracy
    from revlens.theory import rope_score_correlation

    import numpy as np

    theta = 1e4 ** (-2.0 * np.arange(8) / 16)
    kernel = lambda s: np.cos(s * theta).sum()  # noqa: E731
    assert kernel(2 * 3) / 8 == pytest.approx(rope_score_correlation(16, 3, 1e4))  # the filter's B score is the closed form
    # delta = 3: K(6) beats K(3 + o) for every distractor offset o; delta = 2: K(4) loses to K(2 + 4) = K(6)
    assert all(kernel(6) > kernel(3 + o) for o in (1, 2, 4, 5, 6, 7)) and kernel(4) < kernel(6)
    assert matched_filter_reverse_accuracy(16, 3, 1e4) == 1.0
    assert matched_filter_reverse_accuracy(16, 2, 1e4) == 0.0
    assert 0.0 <= matched_filter_reverse_accuracy(64, 12, 1e6) <= 1.0


def test_correlation_ci_brackets_the_estimate():
    from revlens.stats import correlation_ci

    x = [0.1, 0.4, 0.35, 0.8, 0.7, 0.95]
    for kind in ("pearson", "spearman"):
        r, lo, hi = correlation_ci(x, [v + e for v, e in zip(x, (0.3, -0.2, 0.1, -0.3, 0.2, 0.0))], kind)
        assert -1 < lo < r < hi < 1 and r > 0.5
    with pytest.raises(ValueError, match="unknown correlation"):
        correlation_ci(x, x, "kendall")


def test_causal_split_patches_and_ablates():
    from revlens.routing import causal_split

    world = RoutingWorld.generate(n_facts=16, delta=2, seed=0, sentences_per_fact=8)
    cfg = EncoderConfig(d_vocab=world.d_vocab, n_ctx=N_CTX, d_model=32, n_heads=2, d_head=16)
    (model,) = train_stack([Member(cfg, world, 0)], TrainConfig("inplace", steps=150, batch_size=64), progress=False)
    out = causal_split(model, world)
    assert out["reverse_acc"] == routing_metrics(model, world, "inplace")["reverse_acc"]
    ablations = {f"{p}{h}_ablated_acc" for p in ("", "patched_") for h in ("head0", "head1", "all_heads")}
    assert set(out) == {"reverse_acc", "route_patched_acc", "row_patched_acc", "decoy_patched_acc", "decoy_patched_decoy_acc"} | ablations
    # the whole mask row patched: the reverse prompt holds the in-place prompt's tokens, so its answers are the in-place ones
    assert out["row_patched_acc"] == routing_metrics(model, world, "inplace")["inplace_acc"]
    assert all(0.0 <= v <= 1.0 for v in out.values())
    # the patch acts through the key it targets: on a distractor's key it gives that distractor's A
    assert out["decoy_patched_decoy_acc"] > 0.5 > out["decoy_patched_acc"]
    assert out["patched_all_heads_ablated_acc"] <= 2 / 16


def test_cli_sweep_dispatches_on_the_routing_family(tmp_path, capsys):
    from revlens.cli import main

    data = _spec(seeds=[0], train={"steps": 2, "batch_size": 8})
    data["cells"] = [dict(data["cells"][4], deltas=[2, 3])]  # no positions, two offsets
    config = tmp_path / "sweep.json"
    config.write_text(json.dumps(data))
    out = tmp_path / "table.jsonl"
    assert main(["sweep", str(config), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["cell"], r["delta"], r["positional"]) for r in rows] == [("nopos", 2, "none"), ("nopos", 3, "none")]
    data["cells"][0]["deltas"] = [99]
    config.write_text(json.dumps(data))
    assert main(["sweep", str(config), "--out", str(out)]) == 2
    assert "delta 99" in capsys.readouterr().err


def test_untied_projections_index_their_matrices_by_position_id():
    torch.manual_seed(0)
    model = ToyTransformer(EncoderConfig(d_vocab=20, n_ctx=12, d_model=16, n_heads=2, d_head=8, untied_positions=("q", "k")))
    tokens = torch.randint(20, (5, 4))
    plain = model(tokens)
    # positions = 0 .. 3 give the matrices the sequence index gave (another einsum path: float32 rounding)
    torch.testing.assert_close(model(tokens, positions=torch.arange(4).expand(5, 4)), plain, rtol=1e-6, atol=1e-6)
    gaps = torch.tensor([0, 3, 7, 11]).expand(5, 4)
    _, cache = model.run_with_cache(tokens, positions=gaps, names_filter=lambda n: n in ("blocks.0.attn.hook_q", "hook_embed"))
    x, attn = cache["hook_embed"], model.blocks[0].attn
    for index, position in enumerate(gaps[0].tolist()):  # the token at position id 7 uses W_Q[7]
        expected = torch.einsum("bm,hmd->bhd", x[:, index], attn.W_Q[position])
        torch.testing.assert_close(cache["blocks.0.attn.hook_q"][:, index], expected, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        attn.W_Q[7] += 1.0  # changes the output only through the token at position id 7
        attn.W_K[7] += 1.0
    changed = model.run_with_cache(tokens, positions=gaps, names_filter="blocks.0.attn.hook_q")[1]["blocks.0.attn.hook_q"]
    assert torch.equal(changed[:, [0, 1, 3]], cache["blocks.0.attn.hook_q"][:, [0, 1, 3]])
    assert not torch.allclose(changed[:, 2], cache["blocks.0.attn.hook_q"][:, 2])


@pytest.mark.parametrize("delta", [1, 2, 3, 8])
def test_filler_world_puts_a_filler_at_every_empty_position(delta):
    world = RoutingWorld.generate(n_facts=16, delta=delta, seed=1, sentences_per_fact=4, layout="fillers")
    gaps = RoutingWorld.generate(n_facts=16, delta=delta, seed=1, sentences_per_fact=4)
    tokens, positions = world.training_data()
    gap_tokens, gap_positions = gaps.training_data()
    assert tokens.shape[1] == 2 * delta + 2 and torch.equal(positions, torch.arange(2 * delta + 2).expand_as(tokens))
    # the same sentences: each gap-world token sits at its position id, fillers everywhere else
    rebuilt = torch.full_like(tokens, world.fill_id).scatter(1, gap_positions, gap_tokens)
    assert torch.equal(tokens, rebuilt)
    assert int((tokens != world.fill_id).sum(1).min()) == 4  # A, B and two distractors, nothing else
    assert torch.isin(tokens[:, 0], world.alphabet("A")).all()  # A first: no B before its A
    assert not torch.isin(tokens[:, 1:], world.alphabet("A")).any()
    for name in world.eval_set_names:
        es, arranged, _ = world.eval_prompts(name)
        assert (es.prompts[:, es.mask_pos] == world.mask_id).all() and (es.prompts == world.mask_id).sum() == len(es.prompts)
        if name != "forward":
            b = es.prompts.gather(1, arranged.b_index[:, None])[:, 0]
            facts = torch.tensor([world.a_ids.index(a) for a in es.answers.tolist()])
            assert torch.equal(torch.tensor(world.b_ids)[facts], b)  # the fact's own B at offset delta
            assert ((arranged.b_index - es.mask_pos).abs() == delta).all()


@pytest.mark.slow
def test_left_to_right_queries_end_in_the_mask():
    """The ARM's forward query is a training sentence's prefix with the mask in B's slot; its reverse
    query ends in A's slot; no training sentence makes an A a next-token target."""
    world = RoutingWorld.generate(n_facts=16, delta=4, seed=0, sentences_per_fact=8, layout="fillers")
    forward, reverse = world.eval_set("forward"), world.eval_set("reverse")
    full = world.eval_set("inplace")
    assert forward.mask_pos == 4 == forward.prompts.shape[1] - 1 and reverse.mask_pos == reverse.prompts.shape[1] - 1
    assert torch.isin(forward.answers, world.alphabet("B")).all() and torch.isin(reverse.answers, world.alphabet("A")).all()
    assert torch.equal(forward.prompts[:, 1:4], full.prompts[:, 1:4])  # the in-place prompt's distractors, cut at B
    tokens, _ = world.training_data()
    assert not torch.isin(tokens[:, 1:], world.alphabet("A")).any()  # next-token targets are tokens 1 ..
    cfg = EncoderConfig(d_vocab=world.d_vocab, n_ctx=N_CTX, d_model=64, n_heads=4, attention_dir="causal")
    (model,) = train_stack([Member(cfg, world, 0)], TrainConfig("arm", steps=300, batch_size=64, lr=0.005), progress=False)
    out = routing_metrics(model, world, "arm")
    assert out["forward_acc"] >= 0.5 and out["reverse_acc"] <= 0.1  # chance 1/16; A is never a next-token target
    assert out["inplace_acc"] != out["inplace_acc"]  # NaN: a mask at position 0 has no readout for a left-to-right model


def test_held_out_offset_prompts_move_b_and_redraw_distractors():
    world = RoutingWorld.generate(n_facts=16, delta=4, seed=0)
    for eval_delta in (3, 5):
        shifted = dataclasses.replace(world, eval_delta=eval_delta)
        assert torch.equal(shifted.training_data()[0], world.training_data()[0])  # training is untouched
        for name in ("inplace", "reverse"):
            es, base = shifted.eval_set(name), world.eval_set(name)
            offsets = (es.positions - es.positions[:, :1]).abs()
            assert (offsets[:, B_SLOT] == eval_delta).all() and torch.equal(es.answers, base.answers)
            allowed = torch.tensor(distractor_offsets(eval_delta))
            assert torch.isin(offsets[:, 2:], allowed).all() and (offsets[:, 2] != offsets[:, 3]).all()
    assert held_out_offsets(1) == {"dp1": 2} and held_out_offsets(32) == {"dm1": 31, "dp1": 33}
    with pytest.raises(ValueError, match="eval_delta"):
        dataclasses.replace(world, eval_delta=0)


def test_matched_filter_at_held_out_offsets_and_the_nearest_key_baseline():
    import numpy as np

    theta = 1e4 ** (-2.0 * np.arange(8) / 16)
    kernel = lambda s: np.cos(s * theta).sum()  # noqa: E731
    trained, held = 3, 4
    reverse_wins = {o: kernel(trained + o) < kernel(trained + held) for o in distractor_offsets(held)}
    inplace_wins = {o: kernel(o - trained) < kernel(held - trained) for o in distractor_offsets(held)}
    share = lambda wins: np.mean([wins[a] and wins[b] for a in wins for b in wins if a < b])  # noqa: E731
    assert matched_filter_reverse_accuracy(16, trained, 1e4, held) == pytest.approx(share(reverse_wins))
    assert matched_filter_reverse_accuracy(16, trained, 1e4, held, "inplace") == pytest.approx(share(inplace_wins))
    assert not inplace_wins[trained]  # a distractor at the trained offset beats B at a held-out one
    assert matched_filter_reverse_accuracy(16, trained, 1e4, trained, "inplace") == 1.0
    # B nearest to the mask: both distractors beyond delta
    assert nearest_key_share(1) == 1.0 and nearest_key_share(2) == pytest.approx(3 / 6) and nearest_key_share(3) == pytest.approx(6 / 15)


def test_stack_matches_alone_for_the_left_to_right_and_untied_arms():
    """The ARM on the filler layout (bit for bit) and the untied-W_Q/W_K encoder (to float32 rounding): stacked = alone."""
    fillers = [RoutingWorld.generate(n_facts=16, delta=3, seed=s, sentences_per_fact=4, layout="fillers") for s in (0, 1)]
    gaps = [RoutingWorld.generate(n_facts=16, delta=d, seed=s, sentences_per_fact=4) for d, s in ((2, 0), (8, 1))]
    arms = [
        ("arm", [Member(EncoderConfig(d_vocab=w.d_vocab, n_ctx=N_CTX, d_model=32, n_heads=2, attention_dir="causal", rotary_base=b), w, w.seed)
                 for w, b in zip(fillers, (1e2, 1e4))]),
        ("inplace", [Member(EncoderConfig(d_vocab=w.d_vocab, n_ctx=N_CTX, d_model=32, n_heads=2, untied_positions=("q", "k")), w, w.seed)
                     for w in gaps]),
    ]
    for objective, members in arms:
        cfg = TrainConfig(objective, steps=20, batch_size=16)
        for member, model in zip(members, train_stack(members, cfg, progress=False)):
            (alone,) = train_stack([member], cfg, progress=False)
            for (name, p), q in zip(model.named_parameters(), alone.parameters()):
                if objective == "arm":
                    assert torch.equal(p, q), (objective, name)
                else:
                    assert _equal_to_rounding(p, q), (objective, name)


def _equal_to_rounding(p: torch.Tensor, q: torch.Tensor) -> bool:
    """Equal up to float32 rounding: with several threads the vmapped per-position (untied) einsum blocks its
    sums differently from the single model's, so after 20 steps the weights differ by ~1e-7 of their scale
    (bit for bit at one thread). The tolerance, 1e-5 of the tensor's largest entry, is far below any effect."""
    return bool(((p - q).abs().max() <= 1e-5 * q.abs().max()).item())


def test_tie_rule_trained_offset_baseline_and_bootstrap():
    from revlens.routing import trained_offset_share
    from revlens.stats import bootstrap_correlation

    import numpy as np

    # delta 3 evaluated in place at 4: the distractor at 2 scores K(-1) = K(1), exactly B's score
    offsets = distractor_offsets(4)
    theta = 1e4 ** (-2.0 * np.arange(8) / 16)
    kernel = lambda s: np.cos(s * theta).sum()  # noqa: E731
    loses = {o: kernel(o - 3) > kernel(1) + 1e-9 for o in offsets}
    tied = {o: abs(kernel(o - 3) - kernel(1)) < 1e-9 for o in offsets}
    assert tied[2] and loses[3]
    pairs = [(a, b) for a in offsets for b in offsets if a < b]
    split = np.mean([0.0 if loses[a] or loses[b] else 1 / (1 + tied[a] + tied[b]) for a, b in pairs])
    assert matched_filter_reverse_accuracy(16, 3, 1e4, 4, "inplace", ties="split") == pytest.approx(split)
    assert matched_filter_reverse_accuracy(16, 3, 1e4, 4, "inplace") < split  # strict rule: a tie is a loss for B
    with pytest.raises(ValueError, match="tie rule"):
        matched_filter_reverse_accuracy(16, 3, 1e4, ties="coin")
    # "a distractor on the trained offset wins": pairs of offsets of 4 without 3
    assert trained_offset_share(3, 4) == pytest.approx(np.mean([3 not in p for p in pairs]))
    assert trained_offset_share(3, 3) == 1.0
    rng = np.random.default_rng(0)
    x = np.linspace(0, 1, 12)
    y = x[:, None] + rng.normal(0, 0.1, (12, 5))
    for over in ("cells", "seeds"):
        r, lo, hi = bootstrap_correlation(x, y, over=over)
        assert lo <= r <= hi and r == pytest.approx(np.corrcoef(x, y.mean(1))[0, 1])
    with pytest.raises(ValueError, match="resampling"):
        bootstrap_correlation(x, y, over="facts")


def test_shifted_positions_train_every_query_position():
    """``shift_positions``: stacked = alone (to float32 rounding), training differs from unshifted, the sweep cell parses."""
    worlds = [RoutingWorld.generate(n_facts=16, delta=d, seed=0, sentences_per_fact=4) for d in (2, 16)]
    members = [Member(EncoderConfig(d_vocab=w.d_vocab, n_ctx=N_CTX, d_model=32, n_heads=2, untied_positions=("q", "k")), w, 0)
               for w in worlds]
    cfg = TrainConfig("inplace", steps=20, batch_size=16)
    stacked = train_stack(members, cfg, progress=False, shift_positions=True)
    for member, model in zip(members, stacked):
        (alone,) = train_stack([member], cfg, progress=False, shift_positions=True)
        assert all(_equal_to_rounding(p, q) for p, q in zip(model.parameters(), alone.parameters()))
    (plain,) = train_stack(members[:1], cfg, progress=False)
    w_q = dict(stacked[0].named_parameters())["blocks.0.attn.W_Q"]
    assert not torch.equal(w_q, dict(plain.named_parameters())["blocks.0.attn.W_Q"])
    shifted = next(c for c in RoutingSweepSpec.from_dict(_spec()).cells if c.name == "untied-qk-shift")
    assert shifted.shift_positions and not next(c for c in RoutingSweepSpec.from_dict(_spec()).cells if c.name == "untied-qk").shift_positions


@pytest.mark.slow
def test_sweep_in_worker_processes_writes_the_one_process_table(tmp_path):
    """jobs=2 trains chunks in two processes but appends them in sweep order: the same lines as jobs=1."""
    data = _spec(seeds=[0, 1], train={"steps": 3, "batch_size": 8})
    data["cells"] = [dict(data["cells"][0], deltas=[1, 2], bases=[1e4]), dict(data["cells"][3], deltas=[2, 3])]
    data["stack_size"] = 2
    spec = RoutingSweepSpec.from_dict(data)
    serial, parallel = tmp_path / "serial.jsonl", tmp_path / "parallel.jsonl"
    run_routing_sweep(spec, serial, progress=False)
    run_routing_sweep(spec, parallel, progress=False, jobs=2)
    assert parallel.read_text() == serial.read_text() and len(serial.read_text().splitlines()) == 8
    with pytest.raises(ValueError, match="jobs must be a positive integer"):
        run_routing_sweep(spec, tmp_path / "x.jsonl", jobs=0)


def test_explicit_distractor_offsets_hold_every_distractor_and_leave_the_default_world_alone():
    default = RoutingWorld.generate(n_facts=16, delta=2, seed=1, sentences_per_fact=4)
    assert default == RoutingWorld.generate(n_facts=16, delta=2, seed=1, sentences_per_fact=4, distractor_offsets=None)
    assert "distractor_offsets" not in default.to_dict() and default.offset_choices(2) == distractor_offsets(2)
    world = RoutingWorld.generate(n_facts=16, delta=2, seed=1, sentences_per_fact=4, distractor_offsets=(1, 6, 9))
    assert world.to_dict()["distractor_offsets"] == [1, 6, 9] and world.n_positions == 10  # reaches offset 9
    assert torch.equal(world.training_data()[0][:, :2], default.training_data()[0][:, :2])  # same facts, A then B
    for tokens, positions in [world.training_data(), *((es.prompts, es.positions) for es in map(world.eval_set, world.eval_set_names))]:
        offsets = (positions - positions[:, :1]).abs()
        assert (offsets[:, B_SLOT] == 2).all() and torch.isin(offsets[:, 2:], torch.tensor([1, 6, 9])).all()
        assert (offsets[:, 2] != offsets[:, 3]).all() and set(offsets[:, 2:].unique().tolist()) == {1, 6, 9}
    held = dataclasses.replace(world, eval_delta=1)  # held-out B at 1: the distractors keep to 6 and 9
    assert torch.isin((held.eval_set("reverse").positions[:, 2:] - held.eval_set("reverse").positions[:, :1]).abs(),
                      torch.tensor([6, 9])).all()
    fillers = RoutingWorld.generate(n_facts=16, delta=2, seed=1, sentences_per_fact=4, layout="fillers", distractor_offsets=(1, 6, 9))
    tokens, _ = fillers.training_data()
    assert tokens.shape[1] == 10 and int((tokens != fillers.fill_id).sum(1).min()) == 4
    for bad, message in [((2, 5), "hold B's offset"), ((5, 3), "increasing distinct"), ((3,), "fewer than 2"), ((0, 3), "positive")]:
        with pytest.raises(ValueError, match=message):
            RoutingWorld.generate(delta=2, distractor_offsets=bad)
    with pytest.raises(ValueError, match="fewer than 2"):
        dataclasses.replace(RoutingWorld.generate(delta=2, distractor_offsets=(3, 5)), eval_delta=3)


@pytest.mark.parametrize("layout", ["gaps", "fillers"])
def test_single_distractor_prompts_hold_b_and_one_distractor_at_the_offset(layout):
    world = RoutingWorld.generate(n_facts=16, delta=3, seed=0, layout=layout)
    a, b = torch.tensor(world.a_ids), torch.tensor(world.b_ids)
    seen = {}
    for query in ("reverse", "inplace"):
        for offset in (1, 2, 4, 7, 20):  # inside 1 .. 2 delta + 1 and beyond it
            es, arranged, decoys = world.single_distractor_prompts(query, offset)
            rows = torch.arange(len(es.prompts))
            assert (es.prompts[:, es.mask_pos] == world.mask_id).all() and arranged.d_index.shape == (16, 1)
            rel = es.positions[rows, arranged.b_index] - es.positions[:, es.mask_pos]
            rel_d = es.positions[rows, arranged.d_index[:, 0]] - es.positions[:, es.mask_pos]
            sign = -1 if query == "reverse" else 1
            assert (rel == sign * 3).all() and (rel_d == sign * offset).all() and int(es.positions.min()) == 0
            facts = torch.tensor([world.a_ids.index(x) for x in es.answers.tolist()])
            assert torch.equal(es.prompts[rows, arranged.b_index], b[facts])  # the fact's own B
            distractor = es.prompts[rows, arranged.d_index[:, 0]]
            assert torch.isin(distractor, world.alphabet("B")).all() and (distractor != b[facts]).all()
            assert torch.equal(decoys[:, 0], a[torch.tensor([world.b_ids.index(x) for x in distractor.tolist()])])
            entities = torch.isin(es.prompts, world.alphabet("B")).sum(1)
            assert (entities == 2).all()  # exactly B and one distractor
            if layout == "gaps":
                assert es.prompts.shape[1] == 3
            else:
                assert es.prompts.shape[1] == max(8, offset + 1) and ((es.prompts != world.fill_id).sum(1) == 3).all()
            seen.setdefault("decoy", decoys)
            assert torch.equal(decoys, seen["decoy"])  # the same distractor fact at every offset and in both queries
    with pytest.raises(ValueError, match="other than B's"):
        world.single_distractor_prompts("reverse", 3)
    with pytest.raises(ValueError, match="unknown query"):
        world.single_distractor_prompts("forward", 2)


def test_matched_filter_and_nearest_key_on_a_chosen_layout():
    from revlens.routing import matched_filter_score, rope_kernel

    import numpy as np

    theta = 1e4 ** (-2.0 * np.arange(8) / 16)
    assert rope_kernel(6, 16, 1e4) == pytest.approx(np.cos(6 * theta).sum()) == pytest.approx(rope_kernel(-6, 16, 1e4))
    # reverse: a key o before the mask scores K(delta + o); in place, after it: K(o - delta)
    assert matched_filter_score(16, 2, 1e4, 4) == pytest.approx(np.cos(6 * theta).sum())
    assert matched_filter_score(16, 2, 1e4, 4, "inplace") == pytest.approx(np.cos(2 * theta).sum())
    assert matched_filter_reverse_accuracy(16, 2, 1e4, offsets=distractor_offsets(2)) == matched_filter_reverse_accuracy(16, 2, 1e4)
    # delta 2 fails on its default layout (K(6) > K(4)) and succeeds with the distractors at 6 and 7 only
    assert matched_filter_reverse_accuracy(16, 2, 1e4, offsets=[6, 7]) == 1.0
    assert nearest_key_share(2, [1, 6, 7]) == pytest.approx(1 / 3) and nearest_key_share(2) == nearest_key_share(2, distractor_offsets(2))
    with pytest.raises(ValueError, match="at least 2"):
        matched_filter_reverse_accuracy(16, 2, 1e4, offsets=[2, 5])


def test_held_out_metrics_are_nan_where_a_chosen_layout_leaves_one_offset():
    """B at 4, distractors at 5 and 6: B moved to 5 leaves one offset for two distractors, so ``_dp1`` is NaN;
    B moved to 3 keeps both (``_dm1`` measured)."""
    world = RoutingWorld.generate(n_facts=16, delta=4, seed=0, distractor_offsets=(5, 6))
    torch.manual_seed(0)
    model = ToyTransformer(EncoderConfig(d_vocab=world.d_vocab, n_ctx=N_CTX, d_model=32, n_heads=2, d_head=16))
    out = routing_metrics(model, world, "inplace")
    assert all(out[f"{m}_dp1"] != out[f"{m}_dp1"] for m in ("inplace_acc", "reverse_acc", "reverse_attn_b"))
    assert 0.0 <= out["reverse_acc_dm1"] <= 1.0 and 0.0 <= out["reverse_attn_b_dm1"] <= 1.0


def test_highest_frequency_filter_is_the_cosine_rule_at_every_base():
    import itertools
    import math

    from revlens.routing import distractor_offsets, highest_frequency_reverse_accuracy

    for delta in (1, 2, 3, 6, 16):
        offsets = distractor_offsets(delta)
        pairs = list(itertools.combinations(offsets, 2))
        by_hand = sum(all(math.cos(2 * delta) > math.cos(delta + o) for o in pair) for pair in pairs) / len(pairs)
        assert highest_frequency_reverse_accuracy(delta) == pytest.approx(by_hand)
    assert highest_frequency_reverse_accuracy(3) == 1.0 and highest_frequency_reverse_accuracy(2) == 0.0
    assert highest_frequency_reverse_accuracy(4, offsets=[5, 6]) == (math.cos(8) > max(math.cos(9), math.cos(10)))


def test_within_delta_agreement_separates_the_delta_pattern_from_the_base_order():
    from revlens.routing import within_delta_agreement

    deltas = [1, 1, 1, 2, 2, 2, 3, 3, 3]
    pattern = [0.9, 0.9, 0.9, 0.1, 0.1, 0.1, 0.5, 0.5, 0.5]  # what delta alone says
    order = [0.0, 0.0, 0.0, -0.05, 0.0, 0.05, -0.2, 0.0, 0.2]  # how the bases differ at a delta
    measured = [p + o for p, o in zip(pattern, order)]
    right = within_delta_agreement(deltas, measured, measured)
    assert right["within_r"] == pytest.approx(1.0) and right["within_deltas"] == [2, 3] and right["n_within"] == 6
    assert right["pairs_concordant"] == 6 and right["pairs_discordant"] == 0 and right["pairs_unordered"] == 3
    import numpy as np

    assert right["predicted_r"] == pytest.approx(1.0)
    assert right["delta_only_r"] == pytest.approx(np.corrcoef(pattern, measured)[0, 1])  # the per-delta means
    assert right["delta_only_r"] < 0.99
    wrong = within_delta_agreement(deltas, [p - o for p, o in zip(pattern, order)], measured)
    assert wrong["within_r"] == pytest.approx(-1.0) and wrong["pairs_discordant"] == 6
    assert wrong["predicted_r"] > 0.8  # the pattern in delta alone makes a wrong base order look good
    assert wrong["within_low"] <= wrong["within_r"] <= wrong["within_high"]
    with pytest.raises(ValueError, match="fewer than 2 deltas"):
        within_delta_agreement(deltas, pattern, measured)


def test_misrouted_cells_and_compare_by_delta():
    import pandas as pd

    from revlens.routing import compare_by_delta, misrouted_cells

    rows = pd.DataFrame([{"base": 1e4, "delta": d, "seed": s, "reverse_acc": acc, "reverse_attn_b": b, "reverse_attn_d": dd}
                         for d, accs, b, dd in [(2, [0.0, 0.1], 0.01, 0.49), (3, [0.9, 1.0], 0.9, 0.05),
                                                (4, [0.2, 0.4], 0.1, 0.45), (6, [0.3, 0.2], 0.34, 0.33)]
                         for s, acc in enumerate(accs)])
    cells = misrouted_cells(rows).set_index("delta")
    assert cells.below_guess.to_dict() == {2: True, 3: False, 4: False, 6: True}
    assert cells.misrouted.to_dict() == {2: True, 3: False, 4: False, 6: False}  # delta 6: attends to B most
    assert cells.loc[2, "reverse_max"] == 0.1 and cells.loc[2, "n"] == 2
    first = pd.DataFrame({"delta": [3] * 3 + [4] * 3 + [8] * 2, "acc": [0.9, 1.0, 0.95, 0.2, 0.4, 0.3, 0.5, 0.6]})
    second = pd.DataFrame({"delta": [3] * 3 + [4] * 3 + [16] * 2, "acc": [0.1, 0.2, 0.15, 0.3, 0.5, 0.4, 0.5, 0.6]})
    both = compare_by_delta(first, second, "acc")
    assert both.index.tolist() == [3, 4] and both.apart.to_dict() == {3: True, 4: False}  # 8 and 16: one side only
    assert both.loc[3, "mean_first"] == pytest.approx(0.95) and both.loc[3, "mean_second"] == pytest.approx(0.15)
    assert both.loc[3, "half_first"] == pytest.approx(4.303 * 0.05 / 3 ** 0.5, rel=1e-3)  # t(2) = 4.303


def test_storage_split_patches_routes_and_values_at_every_layer():
    """Any depth: everything the mask reads patched gives the in-place answer; in one layer the values at B do not
    change with the positions (so storage cannot fail there), in two they do; values from another fact give that
    fact's A; the filler layout, whose prompts differ in tokens, is refused."""
    from revlens.routing.measures import storage_split

    world = RoutingWorld.generate(n_facts=16, delta=2, seed=0, sentences_per_fact=8)
    one, two = (train_stack([Member(EncoderConfig(d_vocab=world.d_vocab, n_ctx=N_CTX, d_model=32, n_heads=2, d_head=16,
                                              n_layers=n, attn_only=n == 1), world, 0)],
                            TrainConfig("inplace", steps=150, batch_size=64), progress=False)[0] for n in (1, 2))
    for model in (one, two):
        out = storage_split(model, world)
        assert out["reverse_acc"] == routing_metrics(model, world, "inplace")["reverse_acc"]
        assert out["both_patched_acc"] == out["inplace_acc"] == routing_metrics(model, world, "inplace")["inplace_acc"]
        assert out["value_change_l0"] == 0.0
        assert out["donor_storage_donor_acc"] > 0.5 > out["donor_storage_acc"]
    single = storage_split(one, world)
    assert single["route_patched_acc"] == single["inplace_acc"]  # one layer: the score row decides
    assert "value_change_l1" not in single and "mlp_ablated_inplace_acc" not in single
    assert single["value_ablated_l0_acc"] < 0.5 < single["inplace_acc"]  # the answer is read from B's values
    assert "value_noise_l0_acc" not in single  # nothing to move: the first layer's values do not change
    double = storage_split(two, world)
    assert double["value_change_l1"] > 0 and double["mlp_ablated_inplace_acc"] <= 1.0
    assert {"value_ablated_l0_acc", "value_ablated_l1_acc", "value_noise_l1_acc"} <= set(double)
    assert min(double["value_ablated_l0_acc"], double["value_ablated_l1_acc"]) < 0.5  # some layer stores it at B
    with pytest.raises(ValueError, match="same tokens"):
        storage_split(one, RoutingWorld.generate(n_facts=16, delta=2, seed=0, sentences_per_fact=8, layout="fillers"))
