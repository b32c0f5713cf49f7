"""Fact sets, queries, the scorer, the synthetic corpus and the small-pair trainer."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from revlens.facts import Fact, FactSet, Relation, answer_scores, encode_query, is_correct
from revlens.lm import HookedLM
from revlens.lm.analysis import fact_route_correlation, foil_logp, patching_pairs, reverse_patching, score_table
from revlens.lm.corpus import build_tokenizer, make_world, training_sentences
from revlens.lm.small_pair import train_small_pair
from revlens.lm.trainer import PairConfig
from revlens.routes import RoutePrompts, read_routes, read_routes_ragged


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    pc = dataclasses.replace(PairConfig(), d_model=16, n_heads=2, mlp_hidden_size=32, steps=3, batch_size=8, n_facts=20)
    root = train_small_pair(tmp_path_factory.mktemp("pair"), pc)
    return {name: HookedLM.from_pretrained(root / name) for name in ("llada", "llama")}, FactSet.load(root / "world.json")


def test_relation_templates_are_checked():
    with pytest.raises(ValueError, match="forward template needs"):
        Relation("bad", forward="{b} is {a}", reverse="{b} of {a}")
    with pytest.raises(ValueError, match="undefined relation"):
        FactSet({}, [Fact("capital", "France", "Paris")])


def test_queries_put_the_answer_in_the_last_slot():
    rel = Relation("capital", forward="The capital of {a} is {b}.", reverse="{b} is the capital of {a}.")
    facts = FactSet({"capital": rel}, [Fact("capital", "France", "Paris")])
    assert facts.query(0, "forward") == facts.query(0, "forward").__class__(0, "forward", "The capital of France is", "Paris", ".")
    assert (facts.query(0, "reverse").prefix, facts.query(0, "reverse").answer) == ("Paris is the capital of", "France")
    inplace = facts.query(0, "inplace")
    assert (inplace.prefix, inplace.answer, inplace.suffix) == ("The capital of", "France", " is Paris.")


@pytest.mark.parametrize("rule,predicted,expected", [
    ("startswith", " Paris, France", True), ("startswith", "paris", True), ("startswith", "the Paris", False),
    ("substring", "the Paris", True), ("substring", "Lyon", False)])
def test_scoring_rules(rule, predicted, expected):
    assert is_correct(predicted, "Paris", rule) is expected


def test_real_facts_file_loads_with_both_directions():
    facts = FactSet.load("data/real_facts.json")
    assert len(facts.facts) >= 250 and len(facts.relations) == 5
    for i in range(0, len(facts.facts), 37):
        assert facts.query(i, "reverse").answer == facts.facts[i].a


def test_synthetic_world_split_and_sentences():
    world = make_world(40, seed=1)
    sentences = training_sentences(world)
    control = world.subset(split="control")
    assert len(sentences) == len(world.facts) + len(control)
    fo = world.subset(split="forward_only")[0]
    assert world.sentence(fo, "reverse") not in sentences and world.sentence(fo, "forward") in sentences
    tok = build_tokenizer()
    ids = tok(world.facts[0].a)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 3  # BOS + a two-word name, one token each


def test_arm_cannot_answer_inplace_queries(tiny_pair):
    models, world = tiny_pair
    with pytest.raises(ValueError, match="left-to-right"):
        encode_query(models["llama"], world.query(0, "inplace"))


def test_mdm_logp_is_left_to_right_unmasking(tiny_pair):
    models, world = tiny_pair
    lm, q = models["llada"], world.query(0, "reverse")
    enc = encode_query(lm, q)
    prompt = torch.tensor([enc.prompt])
    first = lm.mask_logits(prompt).log_softmax(-1)[0, 0, enc.answer[0]]
    prompt[0, enc.answer_start] = enc.answer[0]
    second = lm.mask_logits(prompt).log_softmax(-1)[0, 0, enc.answer[1]]
    (row,) = answer_scores(lm, [q])
    assert row["logp"] == pytest.approx(float(first + second), abs=1e-5)


def test_parallel_decode_fills_every_slot_from_one_pass(tiny_pair):
    """decode="parallel": the answer is the per-slot argmax of the one pass with every slot masked, and the gold
    log-probability the sum of that pass's per-slot log-probabilities (by hand on the same prompt)."""
    models, world = tiny_pair
    lm, queries = models["llada"], [world.query(i, "reverse") for i in range(4)]
    for q, row in zip(queries, answer_scores(lm, queries, decode="parallel")):
        enc = encode_query(lm, q)
        logp = lm.mask_logits(torch.tensor([enc.prompt])).log_softmax(-1)[0]  # [slot, vocab]
        logp_no_mask = logp.clone()
        logp_no_mask[:, lm.mask_token_id] = float("-inf")  # the decoder never writes the mask token
        assert row["predicted"] == lm.decode(logp_no_mask.argmax(-1).tolist()).strip()
        assert row["logp"] == pytest.approx(float(sum(logp[j, t] for j, t in enumerate(enc.answer))), abs=1e-5)
    table = score_table(lm, world, ("reverse",), decode="parallel")
    assert table.logp.tolist() == pytest.approx([r["logp"] for r in answer_scores(lm, [world.query(i, "reverse")
                                                 for i in range(len(world.facts))], decode="parallel")], abs=1e-6)


def test_sequential_decode_is_the_samplers_low_confidence_fill(tiny_pair):
    """answer_scores(decode="sequential") and lm.generate (low-confidence remasking, greedy, one token per step)
    are two implementations of the same fill: they must commit the same tokens."""
    models, world = tiny_pair
    lm = models["llada"]
    queries = [world.query(i, "reverse") for i in range(len(world.facts))]
    encoded = [encode_query(lm, q) for q in queries]
    same_shape = [i for i, e in enumerate(encoded) if len(e.prompt) == len(encoded[0].prompt)]
    prompts = torch.tensor([encoded[i].prompt for i in same_shape])
    trace = lm.generate(prompts, len(encoded[0].answer))
    rows = answer_scores(lm, [queries[i] for i in same_shape], decode="sequential")
    assert [r["predicted"] for r in rows] == [lm.decode(a.tolist()).strip() for a in trace.answer]


@pytest.mark.parametrize("decode", ["sequential", "parallel"])
def test_mdm_decoders_never_write_the_mask_token(tiny_pair, monkeypatch, decode):
    """A model that ranks its mask token first everywhere (an early MDM can) still gets every slot filled with a
    real token, the same one it ranks second; the gold log-probability is read from the unaltered distribution."""
    models, world = tiny_pair
    lm = models["llada"]
    queries = [world.query(i, "reverse") for i in range(4)]
    honest = answer_scores(lm, queries, decode=decode)
    original = lm.mask_logits

    def mask_first(tokens):
        logits = original(tokens).clone()
        logits[..., lm.mask_token_id] = logits.max() + 100.0
        return logits

    monkeypatch.setattr(lm, "mask_logits", mask_first)
    rows = answer_scores(lm, queries, decode=decode)
    assert [r["predicted"] for r in rows] == [r["predicted"] for r in honest]
    assert all(lm.tokenizer.mask_token not in r["predicted"] for r in rows)
    assert all(r["logp"] < -50 for r in rows)  # the mask token holds nearly all the probability


def test_decode_is_checked(tiny_pair):
    models, world = tiny_pair
    with pytest.raises(ValueError, match="left-to-right"):
        answer_scores(models["llama"], [world.query(0, "forward")], decode="parallel")
    with pytest.raises(ValueError, match="decode"):
        answer_scores(models["llada"], [world.query(0, "forward")], decode="one-shot")


def test_arm_logp_is_teacher_forced(tiny_pair):
    models, world = tiny_pair
    lm, q = models["llama"], world.query(0, "forward")
    enc = encode_query(lm, q)
    full = torch.tensor([enc.prompt + enc.answer])
    logp = lm(full).log_softmax(-1)[0]
    start = len(enc.prompt)
    expected = sum(float(logp[start - 1 + j, t]) for j, t in enumerate(enc.answer))
    (row,) = answer_scores(lm, [q])
    assert row["logp"] == pytest.approx(expected, abs=1e-5)


def test_small_pair_loads_scores_routes_and_patches(tiny_pair):
    models, world = tiny_pair
    assert models["llada"].family.name == "llada" and models["llama"].family.name == "llama"
    table = score_table(models["llada"], world)
    assert set(table.direction) == {"forward", "reverse", "inplace"} and len(table) == 3 * len(world.facts)
    facts = world.subset(split="forward_only")
    for lm in models.values():
        rc = fact_route_correlation(lm, world, facts)
        assert rc.score_corr.shape == (lm.cfg.n_layers, lm.cfg.n_heads)
        result = reverse_patching(lm, patching_pairs(lm, world, facts))
        assert result.resid_pre.shape == (lm.cfg.n_layers, len(result.tokens))
        assert torch.isfinite(result.head_out).all() and result.clean != result.corrupted


def test_foil_baseline_scores_another_facts_answer_in_the_same_prompt(tiny_pair):
    from revlens.facts import answer_logprobs

    models, world = tiny_pair
    indices = world.subset(split="forward_only")
    answers = [world.facts[i].a for i in indices]
    relations = [world.facts[i].relation for i in indices]
    # the foil is the next fact's answer of the same relation that differs (two statements of one person share
    # their answer, under two relations)
    expected = [next(answers[(k + s) % len(answers)] for s in range(1, len(answers))
                     if relations[(k + s) % len(answers)] == relations[k] and answers[(k + s) % len(answers)] != answers[k])
                for k in range(len(answers))]
    for lm in models.values():
        table = foil_logp(lm, world, indices)
        assert table.fact.tolist() == indices and table.foil.tolist() == expected
        # scored in the queried fact's own reverse prompt, one query at a time
        query = world.query(indices[2], "reverse")
        alone = answer_logprobs(lm, [dataclasses.replace(query, answer=expected[2])])
        assert table["foil logp"].iloc[2] == pytest.approx(float(alone[0]), abs=1e-4)
        gold = score_table(lm, world, ("reverse",)).set_index("fact").loc[indices, "logp"].to_numpy()
        assert not np.allclose(table["foil logp"], gold)
    with pytest.raises(ValueError, match="has no other fact of relation 'wrote'"):
        foil_logp(models["llama"], world, [i for i in indices if relations[indices.index(i)] == "wrote"][:1]
                  + [i for i in indices if relations[indices.index(i)] != "wrote"])


def test_ragged_route_reading_matches_batched(tiny_pair):
    models, world = tiny_pair
    lm = models["llada"]
    same_template = world.subset(relation="wrote")[:6]
    prompts = torch.tensor([encode_query(lm, world.query(i, "reverse")).prompt for i in same_template])
    q, k = torch.full((6,), 5), torch.full((6,), 2)
    batched = read_routes(lm, RoutePrompts(prompts, q, k))
    ragged = read_routes_ragged(lm, prompts.tolist(), q.tolist(), k.tolist())
    torch.testing.assert_close(batched.scores, ragged.scores)


def test_reinitialised_keeps_architecture_changes_weights(tiny_pair):
    models, _ = tiny_pair
    lm = models["llada"]
    fresh = lm.reinitialised(seed=0)
    x = torch.tensor([[1, 5, 6, 7]])
    assert fresh.cfg.n_layers == lm.cfg.n_layers and fresh.mask_token_id == lm.mask_token_id
    assert not torch.allclose(fresh(x), lm(x))


@pytest.mark.slow
def test_shipped_small_pair_reproduces_its_recorded_accuracy():
    import json

    from revlens.lm.small_pair import SMALL_PAIR_DIR, pair_accuracy

    recorded = json.loads((SMALL_PAIR_DIR / "training.json").read_text())["accuracy"]
    assert pair_accuracy(SMALL_PAIR_DIR) == pytest.approx(recorded, abs=0.01)
    assert recorded["llama reverse forward_only"] == 0.0 and recorded["llama forward forward_only"] == 1.0


def test_shipped_pair_is_the_shipped_recipe():
    from revlens.lm.small_pair import SHIPPED_PAIR, SMALL_PAIR_DIR

    record = json.loads((SMALL_PAIR_DIR / "training.json").read_text())
    assert record["config"] == dataclasses.asdict(SHIPPED_PAIR)
    assert record["llada_steps"] == SHIPPED_PAIR.steps and record["llama_steps"] == SHIPPED_PAIR.arm_steps
    assert HookedLM.from_pretrained(SMALL_PAIR_DIR / "llada").cfg.n_layers == SHIPPED_PAIR.n_layers
    assert record["llada_curve"][-1]["step"] == SHIPPED_PAIR.steps and record["llama_curve"][-1]["step"] == SHIPPED_PAIR.arm_steps


def test_shipped_switch_tables_cover_three_seeds_and_each_seeds_world():
    """switches.jsonl and heads.jsonl: every MDM switch and its ARM at >= 3 seeds, each run's rows the facts and
    splits of the world its seed and wording draw, a foil on every reverse query of a forward-only fact."""
    import pandas as pd

    from revlens.lm.small_pair import SMALL_PAIR_DIR, SWITCHES, arm_switches

    switches = pd.read_json(SMALL_PAIR_DIR / "switches.jsonl", lines=True)
    heads = pd.read_json(SMALL_PAIR_DIR / "heads.jsonl", lines=True)
    runs = {**SWITCHES, **arm_switches()}
    assert (switches.groupby("switch").seed.nunique().reindex(list(runs)) >= 3).all()
    assert (heads.groupby("switch").seed.nunique().reindex(list(SWITCHES)) >= 3).all()
    assert set(switches.decode[switches.model == "llada"]) == {"sequential", "parallel"}
    assert set(switches.decode[switches.model == "llama"]) == {"sequential"}
    for (switch, seed, _), rows in switches.groupby(["switch", "seed", "decode"]):
        world = make_world(PairConfig.n_facts, seed=seed, wording=runs[switch].get("wording", PairConfig.wording))
        assert len(rows) == len(world.facts) * rows.direction.nunique()
        assert (rows.split == [world.facts[i].split for i in rows.fact]).all()
        foil = (rows.direction == "reverse") & (rows.split == "forward_only")
        assert rows.foil_logp[foil].notna().all() and rows.foil_logp[~foil].isna().all()


def test_dream_scoring_reads_each_answer_token_one_position_early():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         max_position_embeddings=64, mask_token_id=tok.mask_token_id)
    lm = HookedLM.from_module(Qwen2ForCausalLM(config), config, "dream", tokenizer=tok)
    world = make_world(20, seed=0)
    q = world.query(0, "reverse")
    enc = encode_query(lm, q)
    prompt = torch.tensor([enc.prompt])
    first = lm(prompt)[0, enc.answer_start - 1].log_softmax(-1)[enc.answer[0]]  # shifted: read one early
    prompt[0, enc.answer_start] = enc.answer[0]
    second = lm(prompt)[0, enc.answer_start].log_softmax(-1)[enc.answer[1]]
    (row,) = answer_scores(lm, [q])
    assert row["logp"] == pytest.approx(float(first + second), abs=1e-5)


def _fact_file(tmp_path, relations=None, facts=None, **extra):
    data = {"relations": relations if relations is not None else
            [{"name": "capital", "forward": "The capital of {a} is {b}.", "reverse": "{b} is the capital of {a}."}],
            "facts": facts if facts is not None else [{"relation": "capital", "a": "France", "b": "Paris"}], **extra}
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("change, message", [
    ({"facts": [{"relation": "capital", "a": "", "b": ""}]}, r"facts\[0\]: fact a must be a non-empty string"),
    ({"facts": [{"relation": "capital", "a": "France", "b": "  "}]}, r"facts\[0\]: fact b must be a non-empty string"),
    ({"facts": []}, "a fact set needs at least one fact"),
    ({"relations": [{"name": "capital", "forward": "{a} is {b}", "reverse": "{b} of {a}"}] * 2},
     r"relations\[1\]: duplicate relation name 'capital'"),
    ({"facts": [{"relation": "capital", "a": "France", "b": "Paris", "split": "train"}]},
     r"facts\[0\]: unknown split 'train'; expected one of forward_only, control, real"),
    ({"relations": [{"name": "capital", "forward": "{a} is {b} in {c}", "reverse": "{b} of {a}"}]},
     r"relations\[0\]: relation 'capital': the forward template needs exactly the placeholders \{a\} then \{b\}"),
    ({"relations": [{"name": "capital", "forward": "{a} is {b}", "reverse": "{b} of {a!r}"}]}, "reverse template needs exactly"),
    ({"relations": [{"name": "capital", "forward": "{a} is {b} {", "reverse": "{b} of {a}"}]}, "is not a template"),
    ({"facts": [{"relation": "capital", "a": "France", "b": "Paris", "note": 1}]}, r"facts\[0\] has unknown keys \['note'\]"),
    ({"facts": [{"relation": "capital", "a": "France"}]}, r"facts\[0\]: .*missing 1 required positional argument: 'b'"),
    ({"relations": [{"forward": "{a} is {b}", "reverse": "{b} of {a}"}]}, r"relations\[0\]: .*'name'"),
])
def test_bad_fact_files_are_refused_naming_file_and_entry(tmp_path, change, message):
    path = _fact_file(tmp_path, **change)
    with pytest.raises(ValueError, match=rf"{path}: .*{message}"):
        FactSet.load(path)


def test_a_fact_file_that_is_not_json_names_the_line(tmp_path):
    path = tmp_path / "facts.json"
    path.write_text('{"relations": [],\n "facts": [}')
    with pytest.raises(ValueError, match=rf"{path}, line 2, column 12: not valid JSON"):
        FactSet.load(path)


def test_the_shipped_fact_set_loads():
    facts = FactSet.load(Path(__file__).parents[1] / "data" / "real_facts.json")
    assert facts.facts and all(f.a.strip() and f.b.strip() for f in facts.facts)


def test_accuracy_curve_is_recorded_without_changing_the_training(tmp_path):
    from safetensors.torch import load_file

    pc = dataclasses.replace(PairConfig(), d_model=16, n_heads=2, mlp_hidden_size=32, steps=3, batch_size=8, n_facts=20)
    plain = train_small_pair(tmp_path / "plain", pc, ("llada",))
    curved = train_small_pair(tmp_path / "curved", pc, ("llada",), curve_every=2)
    record = json.loads((curved / "training.json").read_text())
    assert [point["step"] for point in record["llada_curve"]] == [2, 3]
    assert record["llada_curve"][-1] | {"step": 3} == {"step": 3, "loss": record["llada_curve"][-1]["loss"], **record["accuracy"]}
    assert "llada_curve" not in json.loads((plain / "training.json").read_text())
    a, b = (load_file(root / "llada" / "model.safetensors") for root in (plain, curved))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_switch_runs_give_a_tidy_table_and_reuse_finished_runs(tmp_path):
    import json as json_

    from revlens.lm.small_pair import SWITCHES, arm_switches, train_switches

    pc = dataclasses.replace(PairConfig(), d_model=16, n_heads=2, mlp_hidden_size=32, steps=2, batch_size=8, n_facts=20)
    table = train_switches(tmp_path, (0,), pc)
    arms = arm_switches()
    assert set(arms) == {"ARM, reworded reverse", "ARM, same-words reverse"}  # entity masking shares the reworded ARM
    assert set(table.switch) == set(SWITCHES) | set(arms) and set(table.seed) == {0}
    assert set(table[table.switch.isin(list(SWITCHES))].model) == {"llada"} and set(table[table.switch.isin(list(arms))].model) == {"llama"}
    assert {"forward", "reverse", "inplace"} == set(table.direction)
    assert table.correct.isin([True, False]).all() and (table.logp <= 0).all()
    # 20 people x 2 templates: three directions per MDM under two decodings, two directions per ARM (no in-place
    # query, left to right only)
    assert len(table) == len(SWITCHES) * 3 * 40 * 2 + len(arms) * 2 * 40
    foil_rows = (table.direction == "reverse") & (table.split == "forward_only")
    assert table.foil_logp[foil_rows].notna().all() and table.foil_logp[~foil_rows].isna().all()
    configs = {p.parent.parent.name: json_.loads((p.parent / "training.json").read_text())["config"]
               for p in tmp_path.glob("*/seed0/world.json")}
    assert configs["entity-masking_reworded-reverse"]["masking"] == "entity"
    assert configs["token-masking_same-words-reverse"]["wording"] == "same_words"
    assert configs["ARM_same-words-reverse"]["wording"] == "same_words"
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/seed0/*/model.safetensors")}
    assert len(stamp) == len(SWITCHES) + len(arms)
    train_switches(tmp_path, (0,), pc)  # finished runs are read, not retrained
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    # ... but only when trained with the same configuration: another learning rate is an error, not a stale table
    with pytest.raises(ValueError, match=r"seed0 holds a (llada|llama) model trained with another configuration "
                                         r"\(differs in lr\)"):
        train_switches(tmp_path, (0,), dataclasses.replace(pc, lr=1e-4))


def test_head_table_lines_up_routes_and_patching_per_head(tiny_pair):
    from revlens.lm.analysis import HEAD_COLUMNS, mdm_head_table

    models, world = tiny_pair
    heads = mdm_head_table(models["llada"], world)
    lm = models["llada"]
    assert list(heads.columns) == list(HEAD_COLUMNS) and len(heads) == lm.cfg.n_layers * lm.cfg.n_heads
    route = fact_route_correlation(lm, world, world.subset(split="forward_only"))
    assert heads.loc[(0, 1), HEAD_COLUMNS[0]] == pytest.approx(float(route.score_corr[0, 1]), nan_ok=True)
    control = reverse_patching(lm, patching_pairs(lm, world, world.subset(split="control")))
    assert heads.loc[(1, 0), HEAD_COLUMNS[2]] == pytest.approx(float(control.head_out[1, 0]), nan_ok=True)


@pytest.mark.slow
def test_regenerate_writes_everything_notebook_05_reads(tmp_path):
    """One tiny run of the whole regeneration: the pair, the recipe at the other seed, the switch table (both
    decodings for the MDMs) and the head table (switch MDMs and the recipe's MDMs at every seed)."""
    import pandas as pd

    from revlens.lm.small_pair import RECIPE_LABEL, SWITCHES, regenerate

    tiny = dataclasses.replace(PairConfig(), d_model=16, n_heads=2, mlp_hidden_size=32, steps=2, batch_size=8, n_facts=40)
    out = regenerate(tmp_path / "pair", tmp_path / "runs", (0, 1), pc=tiny, switch_base=tiny)
    replicate = json.loads((out / "replicate_seed1.json").read_text())
    assert replicate["config"]["seed"] == 1 and "llada reverse forward_only, parallel" in replicate["accuracy"]
    switches = pd.read_json(out / "switches.jsonl", lines=True)
    assert set(switches.switch) >= set(SWITCHES) and set(switches.decode) == {"sequential", "parallel"}
    heads = pd.read_json(out / "heads.jsonl", lines=True)
    assert set(heads[heads.switch == RECIPE_LABEL].seed) == {0, 1}
    assert (heads.groupby(["switch", "seed"]).size() == tiny.n_layers * tiny.n_heads).all()


def test_switch_table_intervals_over_seeds_or_persons():
    import pandas as pd

    from revlens.lm.small_pair import switch_table

    rows = [{"switch": s, "seed": seed, "fact": f, "person": f"p{f // 2}", "direction": d, "split": "forward_only",
             "correct": c, "logp": -1.0 * c}
            for s, seeds in (("one seed", (0,)), ("two seeds", (0, 1)))
            for seed in seeds for f, c in enumerate([True, False, True, True])
            for d in ("forward", "inplace", "reverse")]
    table = switch_table(pd.DataFrame(rows))
    assert table.loc["one seed", "interval over"] == "persons" and table.loc["two seeds", "interval over"] == "seeds"
    # one seed: the two persons' means (0.5 and 1.0) are the sample, not the four facts
    assert table.loc["one seed", "reverse acc"].startswith("0.75 ± ") and table.loc["one seed", "reverse acc"] != \
        switch_table(pd.DataFrame(rows).assign(person=lambda d: d.fact.astype(str))).loc["one seed", "reverse acc"]
    assert table.loc["two seeds", "reverse acc"] == "0.75 ± 0.00"  # identical seeds: no spread
    assert table.loc["two seeds", "reverse acc, control facts"] == "n/a"
    assert table.loc["two seeds", "reverse gold logp, forward-only"] == "-0.75 ± 0.00"  # logp, not accuracy
    assert table.loc["two seeds", "reverse gold - foil (nats), forward-only"] == "n/a"  # no foil scored
    with_foil = pd.DataFrame(rows).assign(foil_logp=-2.0)
    assert switch_table(with_foil).loc["two seeds", "reverse gold - foil (nats), forward-only"] == "1.25 ± 0.00"
    with pytest.raises(ValueError, match="no 'decode' column"):
        switch_table(pd.DataFrame(rows), decode="parallel")
    # MDM rows are kept for the asked decoding only; a model with no parallel rows (the ARM) keeps its sequential ones
    arm = pd.DataFrame(rows).assign(model="arm", decode="sequential", correct=False, switch=lambda d: "ARM " + d.switch)
    decoded = pd.concat([pd.DataFrame(rows).assign(model="llada", decode="sequential"),
                         pd.DataFrame(rows).assign(model="llada", decode="parallel", correct=True), arm])
    for decode, mdm_acc in (("sequential", "0.75 ± 0.00"), ("parallel", "1.00 ± 0.00")):
        table = switch_table(decoded, decode=decode)
        assert table.loc["two seeds", "reverse acc"] == mdm_acc and table.loc["ARM two seeds", "reverse acc"] == "0.00 ± 0.00"
