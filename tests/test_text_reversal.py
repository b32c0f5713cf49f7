"""The reversal-dataset harness: layout reader, tokenizer, scoring rule, ranks, whole-entity masking, a short run."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from revlens.lm.corpus import build_tokenizer, entity_units, make_world
from revlens.lm.small_pair import PairConfig
from revlens.lm.text_reversal import (TEST_FILES, TRAIN_FILES, HarnessConfig, build_text_tokenizer, is_correct_text,
                                      normalise, rank_of, read_examples, read_layout, run_text_reversal)
from revlens.objectives import sample_mdm_mask, sample_span_mask

FIXTURE = Path(__file__).parent / "data" / "reversal_layout"


def test_fixture_is_what_the_generator_writes(tmp_path):
    from tests.reversal_fixture import write

    write(tmp_path)
    for name in TRAIN_FILES + TEST_FILES:
        assert (tmp_path / name).read_text() == (FIXTURE / name).read_text()


def test_layout_reader_reads_every_file():
    layout = read_layout(FIXTURE)
    assert set(layout) == set(TRAIN_FILES + TEST_FILES)
    assert len(layout["p2d_prompts_train.jsonl"]) == 12 and len(layout["validation_prompts.jsonl"]) == 16
    ex = layout["p2d_reverse_prompts_test.jsonl"][0]
    assert ex.prompt.endswith("is") and ex.completion == " Orla Venneker."


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


def test_short_end_to_end_run(tmp_path):
    pair = PairConfig(steps=0, d_model=16, n_heads=2, mlp_hidden_size=32, batch_size=8)
    results = run_text_reversal(FIXTURE, tmp_path / "run", HarnessConfig(pair=pair, max_steps=4, eval_every=2, patience=1))
    assert set(results.file) == set(TEST_FILES)
    assert {"accuracy", "mean gold logp", "mean gold rank", "candidates", "n"} <= set(results.metric)
    models = set(results.model)
    assert {"MDM (LLaDA arch.)", "ARM (LLaMA arch.)"} <= models
    record = json.loads((tmp_path / "run" / "training.json").read_text())
    assert record["models"]["llada"]["steps"] in (2, 4) and record["models"]["llada"]["history"]
    ranks = results[results.metric == "mean gold rank"].value
    cands = results[results.metric == "candidates"].value
    assert (ranks >= 1).all() and (ranks.values <= cands.values).all()
    n = results[(results.metric == "n") & (results.file == "validation_prompts.jsonl")].value
    assert (n == 16).all()
    rows = [json.loads(line) for line in (tmp_path / "run" / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == len(models) * sum(len(read_examples(FIXTURE / f)) for f in TEST_FILES)


def test_training_continues_to_a_fixed_step(tmp_path):
    from revlens.lm.text_reversal import train_until_flat, training_buckets

    layout = read_layout(FIXTURE)
    tok = build_text_tokenizer([t for f in TRAIN_FILES for ex in layout[f] for t in (ex.prompt, ex.completion)])
    buckets = training_buckets(layout, tok)
    assert sum(len(b.tokens) for b in buckets) == 48 and all((b.tokens[:, 0] == tok.bos_token_id).all() for b in buckets)
    hc = HarnessConfig(pair=PairConfig(steps=0, d_model=16, n_heads=2, mlp_hidden_size=32, batch_size=4),
                       max_steps=2, eval_every=2)
    model, opt, step, _ = train_until_flat("llama", buckets, layout, tok, hc, tmp_path / "a")
    assert step == 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, _, step, history = train_until_flat("llama", buckets, layout, tok, hc, tmp_path / "b", start=(model, opt, step),
                                           stop_at=5)
    assert step == 5 and [h["step"] for h in history] == [4, 5]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert (tmp_path / "b" / "model.safetensors").exists()


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
