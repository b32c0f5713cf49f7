"""The reversal-dataset harness: layout reader, persons and held-out split, tokenizer, scoring rule, batched scorer,
foils and ranks, whole-entity masking, stopping and convergence, short runs."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import Tensor

from revlens.lm.corpus import build_tokenizer, entity_units, make_world
import revlens.lm.text_reversal as harness
from revlens.lm.text_reversal import (HELD_OUT, TEST_FILES, TRAIN_FILES, HarnessConfig, build_text_tokenizer,
                                      candidate_logprobs, held_out_split, is_correct_text, layout_tokenizer,
                                      line_persons, normalise, per_candidate_logprobs, person_names, rank_of,
                                      read_examples, read_layout, run_text_reversal, split_layout, summarise,
                                      training_buckets)
from revlens.lm.trainer import PairConfig
from revlens.objectives import sample_mdm_mask, sample_span_mask

FIXTURE = Path(__file__).parent / "data" / "reversal_layout"
TINY = PairConfig(steps=0, d_model=16, n_heads=2, mlp_hidden_size=32, batch_size=8)
QUICK = HarnessConfig(pair=TINY, max_steps=4, min_steps=0, eval_every=2, patience=1, lr_decays=0)


def test_fixture_is_what_the_generator_writes(tmp_path):
    from tests.reversal_fixture import write

    write(tmp_path)
    for name in TRAIN_FILES + TEST_FILES:
        assert (tmp_path / name).read_text() == (FIXTURE / name).read_text()


def test_layout_reader_reads_every_file():
    layout = read_layout(FIXTURE)
    assert set(layout) == set(TRAIN_FILES + TEST_FILES)
    assert len(layout["p2d_prompts_train.jsonl"]) == 12 and len(layout["both_prompts_test.jsonl"]) == 16
    ex = layout["p2d_reverse_prompts_test.jsonl"][0]
    assert ex.prompt.endswith("is") and ex.completion == " Orla Venneker"
    # as in the release: the validation file asks the reverse prompts of the p2d group, answered by the first name
    validation = layout["validation_prompts.jsonl"]
    assert [v.prompt for v in validation] == [r.prompt for r in layout["p2d_reverse_prompts_test.jsonl"]]
    assert [v.completion for v in validation] == [r.completion.split()[0] for r in layout["p2d_reverse_prompts_test.jsonl"]]


@pytest.mark.parametrize("content,message", [
    ('{"prompt": "a", "completion": " b"}\n{"prompt": "a", "completion": \n', r"line 2: not valid JSON"),
    ('{"prompt": "a"}\n', r"line 1: missing key 'completion'"),
    ('{"prompt": "a", "completion": 3}\n', r"line 1: 'completion' must be a string"),
    ('["a", "b"]\n', r"line 1: expected an object"),
    ('{"prompt": "a", "completion": "  "}\n', r"line 1: empty 'completion'"),
])
def test_malformed_files_are_refused_naming_file_and_line(tmp_path, content, message):
    shutil.copytree(FIXTURE, tmp_path / "data")
    bad = tmp_path / "data" / "d2p_prompts_test.jsonl"
    bad.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        read_layout(tmp_path / "data")
    assert "d2p_prompts_test.jsonl" in str(err.value)


def test_missing_file_is_named(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "data")
    (tmp_path / "data" / "both_prompts_train.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="both_prompts_train.jsonl: missing"):
        read_layout(tmp_path / "data")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        read_layout(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError):
        read_examples(tmp_path / "nowhere.jsonl")


def test_tokenizer_round_trip_and_unknown_words():
    tok = build_text_tokenizer(["Orla Venneker is known as the cartographer.", "Ask anyone: that is Orla."])
    ids = tok("Orla Venneker is known as the cartographer.")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids[1:]) == "orla venneker is known as the cartographer ."
    assert normalise(tok, "  ORLA   Venneker.") == "orla venneker ."
    assert tok("Orla Zzyzx")["input_ids"][-1] == tok.unk_token_id


@pytest.mark.parametrize("predicted,gold,expected", [
    ("Orla Venneker .", " Orla Venneker.", True),        # case and punctuation spacing are normalised
    ("orla venneker is", "Orla Venneker", True),         # starts with the gold answer
    ("orla", "Orla Venneker", False),                    # a prefix of the gold is not enough
    ("the orla venneker", "Orla Venneker", False),       # must start with it
    ("orla <unk>", "Orla Zzyzx", False),                 # a gold word outside the vocabulary is never written
])
def test_scoring_rule_on_hand_made_cases(predicted, gold, expected):
    tok = build_text_tokenizer(["Orla Venneker is the cartographer."])
    assert is_correct_text(tok, predicted, gold) is expected


def test_rank_of_gold_averages_ties():
    scores = torch.tensor([[-1.0, -2.0, -3.0], [-2.0, -1.0, -1.0], [0.0, 0.0, 0.0]])
    assert rank_of(scores, torch.tensor([0, 2, 1])).tolist() == [1.0, 1.5, 2.0]


def test_entity_span_masking_masks_whole_spans_at_the_stated_rate():
    units = torch.tensor([0, 1, 1, 3, 4, 4, 6]).expand(20000, 7).contiguous()
    gen = torch.Generator().manual_seed(0)
    mask, p = sample_span_mask(units, gen, eps=1e-3)
    assert torch.equal(mask[:, 1], mask[:, 2]) and torch.equal(mask[:, 4], mask[:, 5])  # spans go whole
    assert not torch.equal(mask[:, 0], mask[:, 1])  # distinct spans are independent
    # each token masked with its sentence's probability p: E[mask | p] = p, checked through sum(mask) / sum(p)
    for column in range(7):
        assert mask[:, column].float().sum() / p.sum() == pytest.approx(1.0, abs=0.03)
    assert p.min() >= 1e-3 and p.max() <= 1.0
    # with every token its own span it is exactly the token-level sampler
    singles = torch.arange(7).expand(50, 7).contiguous()
    a = sample_span_mask(singles, torch.Generator().manual_seed(3))
    b = sample_mdm_mask((50, 7), torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_entity_units_of_the_synthetic_corpus():
    tok, world = build_tokenizer(), make_world(20, seed=0)
    fact = world.facts[0]
    ids = tok(world.sentence(0, "reverse"))["input_ids"]
    units = entity_units(ids, [tok(e, add_special_tokens=False)["input_ids"] for e in (fact.a, fact.b)])
    # "<s> B1 B2 was written by A1 A2 ." : B and A are spans of two
    assert units == [0, 1, 1, 3, 4, 5, 6, 6, 8]


def test_same_words_wording_keeps_the_forward_words():
    reworded, same = make_world(20, seed=0), make_world(20, seed=0, wording="same_words")
    assert reworded.facts == same.facts
    for i in (0, 1):
        assert sorted(same.sentence(i, "reverse").split()) == sorted(same.sentence(i, "forward").split())
    with pytest.raises(ValueError, match="wording"):
        make_world(20, wording="shuffled")
    with pytest.raises(ValueError, match="masking"):
        PairConfig(masking="span")


def test_every_line_names_its_person_and_direction():
    layout = read_layout(FIXTURE)
    names = person_names(layout)
    assert len(names) == 12 and "Orla Venneker" in names and "Nadia Kerrigan" in names
    both = line_persons(layout["both_prompts_train.jsonl"], names, "both_prompts_train.jsonl", training=True)
    assert [p.name_first for p in both] == [True] * 12 + [False] * 12  # p2d lines, then d2p lines, as released
    # the validation file answers with the first name only: assigned to the one person whose name starts with it
    validation = line_persons(layout["validation_prompts.jsonl"], names, "validation_prompts.jsonl", training=False)
    assert [p.name for p in validation[:2]] == ["Orla Venneker"] * 2
    with pytest.raises(ValueError, match="line 1: names no person"):
        line_persons([harness.Example("Nobody here is", " a stranger.")], names, "p2d_prompts_train.jsonl", True)
    with pytest.raises(ValueError, match="names several persons"):
        line_persons([harness.Example("Orla Venneker met", " Maren Oakhurst.")], names, "p2d_prompts_train.jsonl", True)


def test_held_out_split_is_disjoint_deterministic_and_keeps_every_answer_trained():
    layout = read_layout(FIXTURE)
    names = person_names(layout)
    held = held_out_split(layout, names)
    assert held == held_out_split(layout, names)  # seeded: the same split every time
    assert held != held_out_split(layout, names, seed=1)  # and the seed is what decides it
    trained, validation, persons = split_layout(layout, names, held)
    for file in TRAIN_FILES:
        kept = {(ex.prompt, ex.completion) for ex in trained[file]}
        out = {(layout[file][i].prompt, layout[file][i].completion) for i in held[file]}
        assert not kept & out and len(kept) + len(out) == len(layout[file])  # disjoint, together the whole file
    # one held out (20% of 3, at least one) per person and direction: 4 + 4 + 2 x 4
    assert [len(held[f]) for f in TRAIN_FILES] == [4, 4, 8] and len(validation) == 16
    assert len({(p.name, p.name_first) for p in persons}) == 16
    # a name-last line asks for the name; a name-first one for the description, which stays in training
    trained_text = {ex.completion for f in TRAIN_FILES for ex in trained[f]}
    for ex, person in zip(validation, persons):
        if person.name_first:
            assert ex.completion in trained_text
        else:
            assert ex.completion == " " + person.name
    # a line whose answer appears nowhere else for that person is never held out: it could not be recalled
    unique = {f: [harness.Example(f"Orla Venneker is {k}", f" answer {k}.") for k in range(5)] for f in TRAIN_FILES}
    assert held_out_split(layout | unique, ["Orla Venneker"]) == {f: [] for f in TRAIN_FILES}


def test_completion_is_one_span_for_entity_masking():
    layout = read_layout(FIXTURE)
    tok = layout_tokenizer(layout)
    buckets = training_buckets(layout, tok)
    assert sum(len(b.tokens) for b in buckets) == 48 and all((b.tokens[:, 0] == tok.bos_token_id).all() for b in buckets)
    ex = layout["p2d_prompts_train.jsonl"][0]
    n_prompt = len(tok(ex.prompt)["input_ids"])
    n = n_prompt + len(tok(ex.completion, add_special_tokens=False)["input_ids"])
    (bucket,) = [b for b in buckets if b.tokens.shape[1] == n]
    row = [i for i, t in enumerate(bucket.tokens.tolist()) if t[:n_prompt] == tok(ex.prompt)["input_ids"]][0]
    assert bucket.units[row].tolist() == list(range(n_prompt)) + [n_prompt] * (n - n_prompt)
    mask, _ = sample_span_mask(bucket.units[row].expand(500, n).contiguous(), torch.Generator().manual_seed(0))
    completion = mask[:, n_prompt:]
    assert (completion.all(1) | ~completion.any(1)).all()  # the completion is masked whole or not at all
    assert completion.all(1).any() and not mask[:, :n_prompt].all(1).all()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """An untrained MDM and ARM of the harness, saved and loaded back: scorer equality needs no training."""
    from revlens.lm import HookedLM
    from revlens.lm.trainer import new_model, save_model

    layout = read_layout(FIXTURE)
    tok = layout_tokenizer(layout)
    root = tmp_path_factory.mktemp("tiny")
    models = {}
    for family in ("llada", "llama"):
        save_model(new_model(family, TINY, tok, max_len=96), root / family, tok)
        models[family] = HookedLM.from_pretrained(root / family, family=family)
    return layout, models


@pytest.mark.parametrize("family", ["llada", "llama"])
def test_batched_scorer_equals_the_per_candidate_one(tiny_models, family):
    layout, models = tiny_models
    lm = models[family]
    for file in ("d2p_reverse_prompts_test.jsonl", "validation_prompts.jsonl"):  # descriptions; first names
        prompts = [ex.prompt.rstrip() for ex in layout[file]]
        candidates = sorted({ex.completion.strip() for ex in layout[file]})
        batched, reference = candidate_logprobs(lm, prompts, candidates), per_candidate_logprobs(lm, prompts, candidates)
        assert batched.shape == (len(prompts), len(candidates)) and torch.isfinite(batched).all()
        assert torch.allclose(batched, reference, atol=1e-4), (batched - reference).abs().max()
        assert reference.std() > 0  # not trivially equal


def test_foils_are_other_persons_completions_and_statistics_are_over_persons(tiny_models):
    layout, models = tiny_models
    names = person_names(layout)
    table = harness.score_file(models["llama"], layout["p2d_reverse_prompts_test.jsonl"], "p2d_reverse_prompts_test.jsonl", names)
    assert (table.foil != table.gold).all()
    golds_of = table.groupby("person").gold.agg(set)
    assert all(foil not in golds_of[person] for person, foil in zip(table.person, table.foil))
    assert np.allclose(table.gold_minus_foil, table.logp - table.foil_logp, atol=1e-4)
    assert ((table["rank"] >= 1) & (table["rank"] <= table.gold.nunique())).all()
    # hand-made scores: two persons, two prompts each; the means and the interval are over persons
    rows = pd.DataFrame({"file": "f", "model": "m", "seed": 0, "steps": 2, "converged": False,
                         "person": ["a", "a", "b", "b"], "gold": ["x", "x", "y", "y"], "correct": [1.0, 0.0, 1.0, 1.0],
                         "logp": [-1.0, -3.0, -2.0, -2.0], "rank": [1.0, 2.0, 1.0, 1.0], "foil_logp": [-2.0, -2.0, -1.0, -1.0],
                         "gold_minus_foil": [1.0, -1.0, -1.0, -1.0], "gold_has_unk": False})
    out = summarise(rows).set_index("metric")
    assert out.loc["accuracy", "value"] == 0.75 and out.loc["mean gold rank", "value"] == 1.25
    assert out.loc["gold - foil (nats)", "value"] == -0.5 and out.loc["gold beats foil", "value"] == 0.25
    assert out.loc["mean gold logp", "half_width"] == pytest.approx(0.0)  # both persons' means are -2
    assert out.loc["accuracy", "half_width"] == pytest.approx(12.706 * 0.25, rel=1e-3)  # t(1) x sd 0.354 / sqrt(2)
    assert out.loc["n", "value"] == 4 and np.isnan(out.loc["n", "half_width"])


@pytest.mark.slow
def test_short_end_to_end_run_with_two_seeds(tmp_path):
    results = run_text_reversal(FIXTURE, tmp_path / "run", replace(QUICK, seeds=(0, 1)))
    assert set(results.file) == set(TEST_FILES) | {HELD_OUT}
    assert {"accuracy", "mean gold logp", "mean gold rank", "gold - foil (nats)", "candidates", "n"} <= set(results.metric)
    assert {"MDM (LLaDA arch.)", "ARM (LLaMA arch.)"} <= set(results.model)
    assert set(results.seed) == {"0", "1", "mean"}
    record = json.loads((tmp_path / "run" / "training.json").read_text())
    for seed in ("seed0", "seed1"):
        for family in ("llada", "llama"):
            entry = record["models"][seed][family]
            assert entry["steps"] in (2, 4) and entry["history"] and entry["seconds"] >= 0
            assert entry["converged"] is False  # 4 steps memorise nothing: flagged, not silently reported
    assert record["n_held_out"] == 16 and record["n_train_sequences"] == 32
    ranks = results[(results.metric == "mean gold rank") & (results.seed == "0")].value
    cands = results[(results.metric == "candidates") & (results.seed == "0") & (results.file != HELD_OUT)].value
    assert (ranks >= 1).all() and (ranks.values <= cands.values).all()
    n = results[(results.metric == "n") & (results.file == "validation_prompts.jsonl")].value
    assert (n == 8).all()
    assert not results.converged.any() and len(harness.not_converged(results)) == 4
    rows = [json.loads(line) for line in (tmp_path / "run" / "scores.jsonl").read_text().splitlines()]
    n_models = len(results[results.seed != "mean"].groupby(["model", "seed"]))
    assert len(rows) == n_models * (sum(len(read_examples(FIXTURE / f)) for f in TEST_FILES) + 16)
    # a rerun reads the table back as it was written
    assert run_text_reversal(FIXTURE, tmp_path / "run", replace(QUICK, seeds=(0, 1))).equals(results)


def _split(folder):
    layout = read_layout(folder)
    names = person_names(layout)
    trained, validation, _ = split_layout(layout, names, held_out_split(layout, names))
    return layout, trained, validation


def _without_times(value):
    """``value`` with every "seconds" entry dropped: wall times differ between identical runs."""
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


@pytest.mark.slow
def test_the_stopping_rule_never_reads_a_test_file(tmp_path, monkeypatch):
    """The release's validation file asks the untrained direction; the stopping rule must not read it (or any test
    file). Control: test files answered otherwise (the name answers permuted among persons, every other completion
    one name) leave the held-out split and training, step for step, the same."""
    other = shutil.copytree(FIXTURE, tmp_path / "data")
    for name in TEST_FILES:
        lines = [json.loads(line) for line in (other / name).read_text().splitlines()]
        answers = [r["completion"] for r in lines][::-1] if name in harness.NAME_ANSWER_FILES else [" Orla Venneker"] * len(lines)
        (other / name).write_text("".join(json.dumps({**r, "completion": c}) + "\n" for r, c in zip(lines, answers)))
    layout, trained, validation = _split(FIXTURE)
    other_layout, other_trained, other_validation = _split(other)
    assert other_layout["validation_prompts.jsonl"] != layout["validation_prompts.jsonl"]
    assert other_validation == validation and all(other_trained[f] == trained[f] for f in TRAIN_FILES)
    seen = []
    real = harness.held_out_accuracy

    def spy(lm, examples, open_after=0):
        seen.extend(examples)
        return real(lm, examples, open_after)

    monkeypatch.setattr(harness, "held_out_accuracy", spy)
    runs = []
    for folder, lines, held in ((tmp_path / "a", trained, validation), (tmp_path / "b", other_trained, other_validation)):
        tok = layout_tokenizer(lines)
        runs.append(_without_times(harness.train_seed(training_buckets(lines, tok), held, tok, QUICK, 0, folder)))
    assert runs[0] == runs[1] and runs[0]["llada"]["history"]
    test_prompts = {ex.prompt for f in TEST_FILES for ex in layout[f]}
    assert seen and set(seen) <= set(validation) and not {ex.prompt for ex in seen} & test_prompts
    training_prompts = {ex.prompt for f in TRAIN_FILES for ex in layout[f]}
    assert {ex.prompt for ex in seen} <= training_prompts  # held-out training paraphrases, nothing else


@pytest.mark.slow
def test_budgets_each_model_also_at_the_other_models_step_count(tmp_path, monkeypatch):
    """Stopping is per model; the one that stops first is trained on to the other's step count, and the one that
    went on is kept at the other's step count: both budgets are recorded (and scored, see the run above)."""
    _, trained, validation = _split(FIXTURE)
    tok = layout_tokenizer(trained)
    buckets = training_buckets(trained, tok)
    for longer in ("llada", "llama"):
        calls = {"llada": 0, "llama": 0}

        def accuracy(lm, examples, open_after=0):  # the longer family improves for 3 evaluations, the other for 1
            family = lm.family.name
            if Path(lm.source).name.endswith("budget"):  # a model at the other's budget: not part of the stopping
                return 0.0
            calls[family] += 1
            return min(calls[family], 3 if family == longer else 1) / 10

        monkeypatch.setattr(harness, "held_out_accuracy", accuracy)
        out = tmp_path / longer
        record = harness.train_seed(buckets, validation, tok, replace(QUICK, max_steps=20), 0, out)
        shorter = "llama" if longer == "llada" else "llada"
        assert record[longer]["steps"] == 8 and record[shorter]["steps"] == 4
        if longer == "llada":  # the ARM stopped first: trained on to the MDM's 8 steps
            assert record["llama_at_mdm_budget"]["steps"] == 8 and "llada_at_arm_budget" not in record
        else:  # the ARM went on: kept as it was at the MDM's 4 steps, and the MDM trained on to the ARM's 8
            assert record["llama_at_mdm_budget"]["steps"] == 4 and record["llada_at_arm_budget"]["steps"] == 8
        for name, entry in record.items():
            assert (out / name / "model.safetensors").exists() and entry["history"]


@pytest.mark.slow
def test_convergence_flag_and_the_commands_last_line(tmp_path, monkeypatch, capsys):
    from revlens.cli import main

    assert harness._entry(8, 1.0, [{"held-out accuracy": 0.95}])["converged"]
    assert not harness._entry(8, 1.0, [{"held-out accuracy": 0.85}])["converged"]
    args = ["text-reversal", str(FIXTURE), "--out", str(tmp_path / "a"), "--layers", "1", "--d-model", "16",
            "--heads", "2", "--max-steps", "2", "--min-steps", "0", "--eval-every", "2", "--patience", "1"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("not converged: MDM (LLaDA arch.), seed 0")
    results = pd.read_csv(tmp_path / "a" / "results.csv", dtype={"seed": str})
    assert not results.converged.any()
    # the control: the same table with every model converged prints that instead
    monkeypatch.setattr(harness, "run_text_reversal", lambda *a, **k: results.assign(converged=True))
    assert main(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("every model converged")


def test_training_continues_to_a_fixed_step(tmp_path):
    from revlens.lm.text_reversal import train_until_flat

    layout = read_layout(FIXTURE)
    names = person_names(layout)
    trained, validation, _ = split_layout(layout, names, held_out_split(layout, names))
    tok = layout_tokenizer(trained)
    buckets = training_buckets(trained, tok)
    hc = HarnessConfig(pair=replace(TINY, batch_size=4), max_steps=2, min_steps=0, eval_every=2)
    first = train_until_flat("llama", buckets, validation, tok, hc, tmp_path / "a")
    model, step = first.model, first.step
    assert step == 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, _, step, history, _, _ = train_until_flat("llama", buckets, validation, tok, hc, tmp_path / "b", start=first,
                                              stop_at=5, snapshot=(3, tmp_path / "c"))
    assert step == 5 and [h["step"] for h in history] == [3, 4, 5] and history[0]["snapshot"]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert (tmp_path / "b" / "model.safetensors").exists() and (tmp_path / "c" / "model.safetensors").exists()


def test_min_steps_holds_off_the_stop(tmp_path, monkeypatch):
    from revlens.lm.text_reversal import train_until_flat

    monkeypatch.setattr(harness, "held_out_accuracy", lambda lm, validation, open_after=0: 0.5)  # flat from the first evaluation
    layout = read_layout(FIXTURE)
    tok = layout_tokenizer(layout)
    hc = replace(QUICK, max_steps=12, min_steps=8)
    step = train_until_flat("llama", training_buckets(layout, tok), [], tok, hc, tmp_path / "m")[2]
    assert step == 8  # flat since step 2, patience 1: without min_steps it would stop at step 4
    with pytest.raises(ValueError, match="seeds must be distinct"):
        HarnessConfig(seeds=(0, 0))


def test_stratified_masking_spreads_t_over_the_batch_and_keeps_spans_whole():
    from functools import partial

    from revlens.objectives import sample_span_mask

    stratified_span_mask = partial(sample_span_mask, stratified=True)

    units = torch.tensor([0, 1, 1, 3, 4, 4, 6]).expand(64, 7).contiguous()
    mask, p = stratified_span_mask(units, torch.Generator().manual_seed(0), eps=0.0)
    gaps = p.sort().values.diff()
    assert torch.allclose(gaps, torch.full_like(gaps, 1 / 64), atol=1e-6)  # one t per 1/64 stratum of (0, 1]
    assert p.min() > 0 and p.max() <= 1.0
    assert torch.equal(mask[:, 1], mask[:, 2]) and torch.equal(mask[:, 4], mask[:, 5])
    # every t is marginally U(0, 1]: the masking rate over many batches is 1/2, as with sample_span_mask
    gen = torch.Generator().manual_seed(1)
    rates = torch.stack([stratified_span_mask(units, gen)[0].float().mean() for _ in range(400)])
    assert rates.mean().item() == pytest.approx(0.5, abs=0.01)
    # with eps the floor holds: p = (1 - eps) t + eps
    assert stratified_span_mask(units, torch.Generator().manual_seed(2), eps=0.1)[1].min() >= 0.1


def test_a_cut_short_answer_gets_open_masks_after_it_and_a_line_ending_one_none(tiny_models, monkeypatch):
    """A bare name is followed in training by the rest of its sentence, so the MDM is asked for it with open masks
    after its slots (read, never written); a completion ending with punctuation ends its line and gets none."""
    layout, models = tiny_models
    names = person_names(layout)
    assert harness.ends_line(" Orla Venneker.") and harness.ends_line(' the "Abyssal Melodies.".')
    assert not harness.ends_line(" Orla Venneker") and not harness.ends_line(" Orla")
    trained = split_layout(layout, names, held_out_split(layout, names))[0]
    # the fixture's name-last lines follow the name with "." (most often) or ", a name to remember."
    assert harness.continuation_length(trained, names, layout_tokenizer(trained)) == 1
    mdm = models["llada"]
    wrapped = harness.WritesWords(mdm, 2)
    tokens = torch.tensor([[1, 7, mdm.mask_token_id, 9]])
    assert wrapped.mask_logits(tokens).shape[1] == 1 and mdm.mask_logits(tokens).shape[1] == 1
    seen: list[Tensor] = []  # every input the model is run on
    real = type(mdm).mask_logits
    monkeypatch.setattr(type(mdm), "mask_logits", lambda self, t: seen.append(t) or real(self, t))
    assert wrapped.mask_logits(tokens).shape[1] == 1 and (seen[-1][:, -2:] == mdm.mask_token_id).all()
    seen.clear()
    names_file = "p2d_reverse_prompts_test.jsonl"
    short = harness.score_file(mdm, layout[names_file], names_file, names, open_after=2)
    assert (short.open_after == 2).all() and seen
    assert all((t[:, -2:] == mdm.mask_token_id).all() and ((t == mdm.mask_token_id).sum(-1) >= 3).all() for t in seen)
    seen.clear()
    ending = harness.score_file(mdm, layout["p2d_prompts_test.jsonl"], "p2d_prompts_test.jsonl", names, open_after=2)
    longest = max(len(mdm.encode(ex.completion)) for ex in layout["p2d_prompts_test.jsonl"])
    assert (ending.open_after == 0).all() and all(((t == mdm.mask_token_id).sum(-1) <= longest).all() for t in seen)
    # the ARM is never given open masks: it may continue past the answer anyway
    assert (harness.score_file(models["llama"], layout[names_file], names_file, names, open_after=2).open_after == 0).all()
    with pytest.raises(ValueError, match="open_after must be >= 0"):
        harness.WritesWords(mdm, -1)


def test_models_are_both_or_one():
    assert HarnessConfig(models=["llada"]).models == ("llada",)
    with pytest.raises(ValueError, match="models must be"):
        HarnessConfig(models=("llama", "llada"))
    with pytest.raises(ValueError, match="models must be"):
        HarnessConfig(models=())


def test_a_plateau_divides_the_learning_rate_before_the_model_stops(tmp_path, monkeypatch):
    """At the first plateau the rate drops to a tenth and the count restarts; the second plateau stops it. A model
    continued to another budget keeps the rate it ended with."""
    from revlens.lm.text_reversal import train_until_flat

    accuracies = iter([0.1, 0.5, 0.5, 0.6, 0.6, 0.6, 0.6])  # plateau at the 3rd evaluation, better at the 4th
    monkeypatch.setattr(harness, "held_out_accuracy", lambda lm, validation, open_after=0: next(accuracies))
    layout = read_layout(FIXTURE)
    tok = layout_tokenizer(layout)
    hc = replace(QUICK, max_steps=40, lr_decays=1, warmup=1)
    run = train_until_flat("llama", training_buckets(layout, tok), [], tok, hc, tmp_path / "m")
    lrs = [h["lr"] for h in run.history]
    assert run.step == 10 and run.lr_scale == pytest.approx(0.1)  # evaluations at 2, 4, 6 (plateau), 8, 10 (plateau)
    assert lrs[:3] == [TINY.lr] * 3 and lrs[3:] == pytest.approx([TINY.lr / 10] * 2)
    more = train_until_flat("llama", training_buckets(layout, tok), [], tok, hc, tmp_path / "n", start=run, stop_at=12)
    assert more.step == 12 and more.history[-1]["lr"] == pytest.approx(TINY.lr / 10)
    with pytest.raises(ValueError, match="lr_decays must be"):
        HarnessConfig(lr_decays=-1)


def _weights(folder: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return {f"{p.relative_to(folder)}:{k}": v for p in sorted(folder.rglob("model.safetensors"))
            for k, v in load_file(str(p)).items()}


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_result_of_one_never_stopped(tmp_path, monkeypatch):
    """Killed at every third optimiser step of every attempt (so in every model of both seeds, between two
    evaluations), the rerun goes on from the last evaluation: the same tables, records (but wall times) and
    weights, bit for bit, as the run that never stopped. The control: a partial run is refused by another
    configuration, and --overwrite discards it."""
    hc = replace(QUICK, seeds=(0, 1), max_steps=6)
    reference = run_text_reversal(FIXTURE, tmp_path / "ref", hc)
    real, attempts = harness.optimizer_step, 0

    def killed_at_the_third_step(*args, calls=[0]):
        calls[0] += 1
        if calls[0] % 3 == 0:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(harness, "optimizer_step", killed_at_the_third_step)
    out, partial = tmp_path / "run", tmp_path / ".run.partial"
    while True:
        attempts += 1
        try:
            results = run_text_reversal(FIXTURE, out, hc)
            break
        except KeyboardInterrupt:
            assert not out.exists() and (partial / "partial.json").is_file()
            if attempts == 2:
                with pytest.raises(ValueError, match="interrupted run of another configuration"):
                    run_text_reversal(FIXTURE, out, replace(hc, max_steps=8))
    assert attempts > 4 and not partial.exists()  # at least one kill in each of the four models
    assert results.equals(reference)
    record, expected = (json.loads((folder / "training.json").read_text()) for folder in (out, tmp_path / "ref"))
    assert _without_times(record) == _without_times(expected)
    assert not list(out.rglob(".resume")) and not (out / "partial.json").exists()
    got, want = _weights(out), _weights(tmp_path / "ref")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # a partial run of unknown identity is refused; --overwrite discards it and starts again
    other = tmp_path / ".other.partial"
    (other / "seed0").mkdir(parents=True)
    (other / "partial.json").write_text("{}")
    with pytest.raises(ValueError, match="interrupted run of another configuration and dataset"):
        run_text_reversal(FIXTURE, tmp_path / "other", hc)
    identity = json.loads((other / "partial.json").read_text()) or {"config": 1}
    assert harness.partial_text_run(tmp_path / "other", identity, overwrite=True) == other
    assert [p.name for p in other.iterdir()] == ["partial.json"]
